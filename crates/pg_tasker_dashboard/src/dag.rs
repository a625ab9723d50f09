//! A task's DAG as SVG: one box per step in columns by depth (the longest
//! path from a root), one arrow per dependency, boxes colored by state.
//! Text goes through maud, which escapes it.

use std::collections::HashMap;

use maud::{html, Markup};

/// A step as the picture needs it.
#[derive(Debug, Clone)]
pub struct Node {
    pub name: String,
    pub state: String,
    pub attempts: i32,
    pub max_attempts: i32,
    pub dependencies: Vec<String>,
}

/// Steps drawn at most; a bigger task is listed, not drawn.
pub const MAX_NODES: usize = 400;

const W: i64 = 170;
const H: i64 = 46;
const DX: i64 = 220;
const DY: i64 = 64;
const PAD: i64 = 16;

/// The fill and stroke of a state (those of tasker.task_graph's Mermaid).
pub fn colors(state: &str) -> (&'static str, &'static str) {
    match state {
        "complete" | "resolved_manually" => ("#c8e6c9", "#2e7d32"),
        "error" => ("#ffcdd2", "#c62828"),
        "waiting_for_retry" => ("#ffe0b2", "#ef6c00"),
        "enqueued" => ("#bbdefb", "#1565c0"),
        "in_progress" => ("#90caf9", "#0d47a1"),
        "cancelled" => ("#e0e0e0", "#424242"),
        _ => ("#eeeeee", "#757575"),
    }
}

/// Column (depth) and row of every step, by index.
pub fn layout(nodes: &[Node]) -> Vec<(i64, i64)> {
    let index: HashMap<&str, usize> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.name.as_str(), i))
        .collect();
    let mut depth: Vec<Option<i64>> = vec![None; nodes.len()];
    // (a template is acyclic; the loop bound guards against bad data)
    for _ in 0..=nodes.len() {
        let mut changed = false;
        for (i, n) in nodes.iter().enumerate() {
            let d = n
                .dependencies
                .iter()
                .filter_map(|p| index.get(p.as_str()))
                .map(|&p| depth[p].map(|d| d + 1))
                .try_fold(0, |acc, d| d.map(|d| acc.max(d)));
            if d.is_some() && depth[i] != d {
                depth[i] = d;
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    let mut rows: HashMap<i64, i64> = HashMap::new();
    depth
        .iter()
        .map(|d| {
            let col = d.unwrap_or(0);
            let row = rows.entry(col).or_insert(0);
            *row += 1;
            (col, *row - 1)
        })
        .collect()
}

/// The SVG of a task's steps.
pub fn svg(nodes: &[Node]) -> Markup {
    let at = layout(nodes);
    let index: HashMap<&str, usize> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.name.as_str(), i))
        .collect();
    let width = at.iter().map(|(c, _)| c).max().map_or(0, |c| c + 1) * DX + PAD * 2;
    let height = at.iter().map(|(_, r)| r).max().map_or(0, |r| r + 1) * DY + PAD * 2;
    let pos = |i: usize| (PAD + at[i].0 * DX, PAD + at[i].1 * DY);
    html! {
        svg xmlns="http://www.w3.org/2000/svg" class="dag" width=(width) height=(height)
            viewBox=(format!("0 0 {width} {height}")) role="img" aria-label="task graph" {
            defs {
                marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7"
                    orient="auto-start-reverse" { path d="M 0 0 L 10 5 L 0 10 z" fill="#616161" {} }
            }
            @for (i, n) in nodes.iter().enumerate() {
                @for p in &n.dependencies {
                    @if let Some(&j) = index.get(p.as_str()) {
                        @let ((x1, y1), (x2, y2)) = (pos(j), pos(i));
                        line x1=(x1 + W) y1=(y1 + H / 2) x2=(x2) y2=(y2 + H / 2)
                            stroke="#616161" stroke-width="1.5" marker-end="url(#arrow)" {}
                    }
                }
            }
            @for (i, n) in nodes.iter().enumerate() {
                @let (x, y) = pos(i);
                @let (fill, stroke) = colors(&n.state);
                g class="step" data-state=(n.state) {
                    title { (n.name) " — " (n.state) }
                    rect x=(x) y=(y) width=(W) height=(H) rx="6" fill=(fill) stroke=(stroke) stroke-width="1.5" {}
                    text x=(x + 8) y=(y + 19) font-size="13" font-family="sans-serif" {
                        (truncate(&n.name, 22))
                    }
                    text x=(x + 8) y=(y + 36) font-size="11" font-family="sans-serif" fill="#424242" {
                        (n.state) " (" (n.attempts) "/" (n.max_attempts) ")"
                    }
                }
            }
        }
    }
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        s.chars().take(n - 1).collect::<String>() + "…"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, deps: &[&str]) -> Node {
        Node {
            name: name.into(),
            state: "pending".into(),
            attempts: 0,
            max_attempts: 3,
            dependencies: deps.iter().map(|d| d.to_string()).collect(),
        }
    }

    #[test]
    fn columns_follow_the_longest_path() {
        // a diamond with a shortcut: end depends on start and on right
        let n = vec![
            node("start", &[]),
            node("left", &["start"]),
            node("right", &["left"]),
            node("end", &["start", "right"]),
        ];
        let at = layout(&n);
        assert_eq!(at, vec![(0, 0), (1, 0), (2, 0), (3, 0)]);
        let n = vec![
            node("a", &[]),
            node("b", &["a"]),
            node("c", &["a"]),
            node("d", &["b", "c"]),
        ];
        assert_eq!(layout(&n), vec![(0, 0), (1, 0), (1, 1), (2, 0)]);
    }

    #[test]
    fn text_is_escaped() {
        let s = svg(&[node("<img src=x onerror=alert(1)>", &[])]).into_string();
        assert!(!s.contains("<img"), "{s}");
        assert!(s.contains("&lt;img"), "{s}");
        assert_eq!(s.matches("<line").count(), 0);
        let s = svg(&[node("a", &[]), node("b", &["a"])]).into_string();
        assert_eq!(s.matches("<line").count(), 1);
    }
}
