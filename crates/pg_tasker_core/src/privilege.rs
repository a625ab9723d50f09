//! Namespace privileges (sql/03_privileges.sql): what a privilege needs,
//! in one place. A privilege is held in every namespace by members of a
//! cluster-wide role, or in one namespace through a grant of it or of a
//! privilege that includes it (admin includes worker and app).

/// What an operation needs in a namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Need {
    Worker,
    App,
    Admin,
    /// Any privilege: what seeing a namespace's tasks takes.
    Any,
}

impl Need {
    pub fn parse(s: &str) -> Option<Need> {
        match s {
            "worker" => Some(Need::Worker),
            "app" => Some(Need::App),
            "admin" => Some(Need::Admin),
            "any" => Some(Need::Any),
            _ => None,
        }
    }

    /// The cluster-wide roles whose members hold it in every namespace.
    pub fn cluster_roles(self) -> &'static [&'static str] {
        match self {
            Need::Worker => &["tasker_worker"],
            Need::App => &["tasker_app"],
            Need::Admin => &["tasker_admin"],
            // (tasker_admin is a member of both)
            Need::Any => &["tasker_worker", "tasker_app"],
        }
    }

    /// The granted privileges (tasker.namespace_privilege) that include it.
    pub fn granted(self) -> &'static [&'static str] {
        match self {
            Need::Worker => &["worker", "admin"],
            Need::App => &["app", "admin"],
            Need::Admin => &["admin"],
            Need::Any => &["worker", "app", "admin"],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_includes_worker_and_app_and_any_is_any_privilege() {
        for n in [Need::Worker, Need::App, Need::Admin, Need::Any] {
            assert!(n.granted().contains(&"admin"), "{n:?}");
        }
        assert_eq!(Need::Admin.granted(), ["admin"]);
        assert_eq!(Need::Any.granted(), ["worker", "app", "admin"]);
        assert!(!Need::App.granted().contains(&"worker"));
        assert!(!Need::Worker.granted().contains(&"app"));
        assert_eq!(Need::parse("owner"), None);
        assert_eq!(Need::parse("any"), Some(Need::Any));
        assert_eq!(Need::Any.cluster_roles(), ["tasker_worker", "tasker_app"]);
    }
}
