//! Where the worker connects, and the checks it makes before it serves:
//! misconfiguration (a wrong password, an unknown role, database or
//! namespace, a missing or incompatible extension) ends the worker with a
//! message naming the cause instead of retrying forever; a server that is
//! not up yet is waited for.

use std::time::Duration;

use tokio_postgres::config::Host;
use tokio_postgres::error::SqlState;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{Client, Config, Socket};

use crate::tls::{SslMode, Tls};

/// A database to connect to: tokio-postgres's settings (what it derefs to)
/// and the TLS its sslmode asks for ([`crate::tls`]).
#[derive(Clone)]
pub struct Database {
    config: Config,
    tls: Tls,
    pub ssl_mode: SslMode,
}

/// A connection's half that must be polled (spawned) for its client.
pub type DbConnection = tokio_postgres::Connection<Socket, <Tls as MakeTlsConnect<Socket>>::Stream>;

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // (tokio-postgres's Config redacts the password)
        f.debug_struct("Database")
            .field("config", &self.config)
            .field("ssl_mode", &self.ssl_mode)
            .finish()
    }
}

impl std::ops::Deref for Database {
    type Target = Config;
    fn deref(&self) -> &Config {
        &self.config
    }
}

impl Database {
    /// Opens a connection, with TLS as sslmode says.
    pub async fn connect(&self) -> Result<(Client, DbConnection), tokio_postgres::Error> {
        self.config.connect(self.tls.clone()).await
    }
}

/// Takes `sslmode` and `sslrootcert` out of a URL or `key=value` string
/// (tokio-postgres knows neither verify-ca / verify-full nor sslrootcert):
/// (the rest, sslmode, sslrootcert).
fn take_tls_options(url: &str) -> Result<(String, Option<String>, Option<String>), String> {
    let tls_key = |k: &str| k == "sslmode" || k == "sslrootcert";
    let (mut mode, mut root) = (None, None);
    let mut keep = |k: &str, v: String| -> bool {
        match k {
            "sslmode" => mode = Some(v),
            "sslrootcert" => root = Some(v),
            _ => return true,
        }
        false
    };
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let Some((base, query)) = url.split_once('?') else {
            return Ok((url.to_string(), None, None));
        };
        let rest: Vec<&str> = query
            .split('&')
            .filter(|pair| {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                !tls_key(k) || keep(k, percent_decode(v))
            })
            .collect();
        let url = if rest.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", rest.join("&"))
        };
        return Ok((url, mode, root));
    }
    // key=value pairs, values plain or single-quoted with backslash escapes
    let mut rest = Vec::new();
    let mut chars = url.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            break;
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('=') {
            return Err(format!("invalid database URL: \"{key}\" has no value"));
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            loop {
                match chars.next() {
                    None => return Err("invalid database URL: unterminated quoted value".into()),
                    Some('\'') => break,
                    Some('\\') => value.extend(chars.next()),
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                chars.next();
                if c == '\\' {
                    value.extend(chars.next());
                } else {
                    value.push(c);
                }
            }
        }
        if keep(&key, value.clone()) {
            rest.push(format!(
                "{key}='{}'",
                value.replace('\\', "\\\\").replace('\'', "\\'")
            ));
        }
    }
    Ok((rest.join(" "), mode, root))
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = s
            .get(i + 1..i + 3)
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (b[i], hex) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The connection settings of a database URL (or `key=value` string), with
/// what it leaves out taken from the libpq environment variables (PGHOST,
/// PGPORT, PGUSER, PGPASSWORD, PGDATABASE, PGAPPNAME, PGSSLMODE,
/// PGSSLROOTCERT) as libpq would; an empty URL means "all from the
/// environment". `sslmode` and `sslrootcert` choose the TLS
/// ([`crate::tls`]).
pub fn database_config(url: &str) -> Result<Database, String> {
    database_config_with(url, &|k| std::env::var(k).ok())
}

pub fn database_config_with(
    url: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Database, String> {
    let (url, mode, root) = take_tls_options(url.trim())?;
    let mut cfg = if url.trim().is_empty() {
        Config::new()
    } else {
        // (the parser's message never contains the password)
        url.parse::<Config>()
            .map_err(|e| format!("invalid database URL: {e}"))?
    };
    let ssl_mode = SslMode::parse(
        &mode
            .or_else(|| env("PGSSLMODE").filter(|m| !m.is_empty()))
            .unwrap_or_else(|| "prefer".into()),
    )?;
    let root = root.or_else(|| env("PGSSLROOTCERT").filter(|r| !r.is_empty()));
    let tls = Tls::new(crate::tls::client_config(ssl_mode, root.as_deref())?);
    if cfg.get_hosts().is_empty() {
        match env("PGHOST").filter(|h| !h.is_empty()) {
            Some(hosts) => {
                for h in hosts.split(',') {
                    cfg.host(h);
                }
            }
            None if std::path::Path::new("/var/run/postgresql").is_dir() => {
                cfg.host("/var/run/postgresql");
            }
            None => {
                cfg.host("localhost");
            }
        }
    }
    if cfg.get_ports().is_empty() {
        if let Some(p) = env("PGPORT").filter(|p| !p.is_empty()) {
            let port = p
                .parse::<u16>()
                .map_err(|_| format!("PGPORT is not a port number: {p:?}"))?;
            cfg.port(port);
        }
    }
    if cfg.get_user().is_none() {
        match env("PGUSER")
            .or_else(|| env("USER"))
            .filter(|u| !u.is_empty())
        {
            Some(u) => cfg.user(&u),
            None => return Err("no database user: give one in the URL or in PGUSER".into()),
        };
    }
    if cfg.get_password().is_none() {
        if let Some(p) = env("PGPASSWORD") {
            cfg.password(p);
        }
    }
    if cfg.get_dbname().is_none() {
        if let Some(d) = env("PGDATABASE").filter(|d| !d.is_empty()) {
            cfg.dbname(&d);
        }
    }
    if cfg.get_application_name().is_none() {
        cfg.application_name(env("PGAPPNAME").unwrap_or_else(|| "pg-tasker-worker".into()));
    }
    // (as libpq: no TLS over Unix-domain sockets, the server offers none)
    let unix_only = cfg.get_hosts().iter().all(|h| !matches!(h, Host::Tcp(_)));
    cfg.ssl_mode(if unix_only {
        tokio_postgres::config::SslMode::Disable
    } else {
        ssl_mode.negotiation()
    });
    Ok(Database {
        config: cfg,
        tls,
        ssl_mode,
    })
}

/// The database a configuration names (the server's default: the user's
/// name) and its user.
fn database_and_user(cfg: &Config) -> (&str, &str) {
    let user = cfg.get_user().unwrap_or("?");
    (cfg.get_dbname().unwrap_or(user), user)
}

/// The server, database and role a configuration names, without secrets.
pub fn describe(cfg: &Config) -> String {
    let hosts: Vec<String> = cfg
        .get_hosts()
        .iter()
        .map(|h| match h {
            Host::Tcp(name) => name.clone(),
            Host::Unix(path) => path.display().to_string(),
        })
        .collect();
    let ports: Vec<String> = cfg.get_ports().iter().map(u16::to_string).collect();
    let (dbname, user) = database_and_user(cfg);
    format!(
        "host={} port={} dbname={} user={}",
        hosts.join(","),
        if ports.is_empty() {
            "5432".into()
        } else {
            ports.join(",")
        },
        dbname,
        user
    )
}

/// The extension versions this worker speaks: the same major.minor as the
/// SDK.
fn compatible(extversion: &str) -> bool {
    let mm = |v: &str| v.split('.').take(2).collect::<Vec<_>>().join(".");
    mm(extversion) == mm(env!("CARGO_PKG_VERSION"))
}

/// A cause that retrying cannot fix, as a sentence for the operator.
pub fn fatal_cause(cfg: &Config, e: &tokio_postgres::Error) -> Option<String> {
    let db = e.as_db_error()?;
    let (dbname, user) = database_and_user(cfg);
    let code = db.code();
    if *code == SqlState::INVALID_PASSWORD {
        Some(format!(
            "authentication failed for role \"{user}\" ({}); check the password (URL or PGPASSWORD)",
            db.message()
        ))
    } else if *code == SqlState::INVALID_CATALOG_NAME {
        Some(format!(
            "database \"{dbname}\" does not exist ({})",
            db.message()
        ))
    } else if *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION {
        Some(format!(
            "the server refuses role \"{user}\": {}",
            db.message()
        ))
    } else {
        None
    }
}

/// A TLS failure that retrying cannot fix: the server's certificate is not
/// accepted (sslmode verify-ca / verify-full and sslrootcert), or the
/// server does not speak TLS (sslmode require or stricter).
pub fn tls_cause(cfg: &Database, e: &tokio_postgres::Error) -> Option<String> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(c) = cause {
        let inner = c
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .map(|i| i as &(dyn std::error::Error + 'static))
            .unwrap_or(c);
        if let Some(rustls::Error::InvalidCertificate(why)) = inner.downcast_ref::<rustls::Error>()
        {
            return Some(format!(
                "the server's certificate is not accepted ({why:?}) by sslmode={:?} for {}; check the host name and the root certificate (sslrootcert)",
                cfg.ssl_mode,
                describe(cfg)
            ));
        }
        cause = inner.source();
    }
    e.to_string().contains("does not support TLS").then(|| {
        format!(
            "the server does not accept TLS connections (sslmode={:?}, {})",
            cfg.ssl_mode,
            describe(cfg)
        )
    })
}

/// Waits between attempts after a failure: the first, and the longest.
pub const BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));

/// The wait after `prev` (zero: the first failure): doubling, capped.
pub fn next_backoff(prev: Duration) -> Duration {
    if prev.is_zero() {
        BACKOFF.0
    } else {
        (prev * 2).min(BACKOFF.1)
    }
}

/// What the worker does after a statement failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Transient: the same statement may succeed later (on a fresh
    /// connection when this one is gone). Retried with backoff.
    Retry,
    /// Retrying the same statement would fail the same way: logged with its
    /// SQLSTATE, and the worker moves on.
    Final,
}

/// Classifies a failure by its SQLSTATE (`None`: no server error, i.e. the
/// connection broke or could not be opened). One home for the rule, used
/// for every statement the runtime sends.
pub fn classify(sqlstate: Option<&str>) -> ErrorClass {
    let Some(code) = sqlstate else {
        return ErrorClass::Retry;
    };
    let class = code.get(..2).unwrap_or("");
    match (class, code) {
        // connection exception; insufficient resources; system errors (I/O)
        ("08" | "53" | "58", _) => ErrorClass::Retry,
        // serialization failure, deadlock detected, statement completion unknown
        (_, "40001" | "40P01" | "40003") => ErrorClass::Retry,
        // admin / crash shutdown, cannot connect now (starting up), query
        // cancelled (statement_timeout, pg_cancel_backend), lock timeout
        (_, "57P01" | "57P02" | "57P03" | "57014" | "55P03") => ErrorClass::Retry,
        _ => ErrorClass::Final,
    }
}

/// [`classify`] for a client error.
pub fn classify_error(e: &tokio_postgres::Error) -> ErrorClass {
    if e.is_closed() {
        return ErrorClass::Retry;
    }
    classify(e.code().map(SqlState::code))
}

/// An error for a log line: its SQLSTATE first, when the server sent one.
pub fn explain(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} {}", db.code().code(), db.message()),
        None => match std::error::Error::source(e) {
            Some(cause) => format!("{e}: {cause}"),
            None => e.to_string(),
        },
    }
}

/// Connects once (waiting, with a log line per attempt, while the server
/// cannot be reached) and checks the extension and every namespace. Err:
/// why this worker cannot serve, as a sentence.
pub async fn check_startup(
    cfg: &Database,
    namespaces: &[String],
    log: &(dyn Fn(String) + Sync),
) -> Result<(), String> {
    let mut wait = Duration::from_millis(200);
    let client = loop {
        match cfg.connect().await {
            Ok((client, connection)) => {
                tokio::spawn(connection);
                break client;
            }
            Err(e) => {
                if let Some(cause) = fatal_cause(cfg, &e).or_else(|| tls_cause(cfg, &e)) {
                    return Err(cause);
                }
                log(format!(
                    "cannot reach the database ({}: {e}); retrying in {wait:?}",
                    describe(cfg)
                ));
                tokio::time::sleep(wait).await;
                wait = next_backoff(wait);
            }
        }
    };
    let ext = client
        .query_opt(
            "SELECT extversion FROM pg_catalog.pg_extension WHERE extname = 'pg_tasker'",
            &[],
        )
        .await
        .map_err(|e| format!("cannot check the pg_tasker extension: {e}"))?;
    let (dbname, user) = database_and_user(cfg);
    match ext {
        None => {
            return Err(format!(
                "the pg_tasker extension is not installed in database \"{dbname}\" (CREATE EXTENSION pg_tasker CASCADE)"
            ))
        }
        Some(row) => {
            let v: String = row.get(0);
            if !compatible(&v) {
                return Err(format!(
                    "database \"{dbname}\" has pg_tasker {v}; this worker speaks {} (ALTER EXTENSION pg_tasker UPDATE, or a matching worker)",
                    env!("CARGO_PKG_VERSION")
                ));
            }
        }
    }
    for ns in namespaces {
        if let Err(e) = client
            .query_one("SELECT tasker.wake_channel($1)", &[ns])
            .await
        {
            let Some(db) = e.as_db_error() else {
                return Err(format!("cannot check namespace \"{ns}\": {e}"));
            };
            return Err(if *db.code() == SqlState::UNDEFINED_OBJECT {
                format!("namespace \"{ns}\" is not registered in database \"{dbname}\" (register a template of it first)")
            } else if *db.code() == SqlState::INSUFFICIENT_PRIVILEGE {
                format!(
                    "role \"{user}\" may not work on namespace \"{ns}\": {} ({})",
                    db.message(),
                    db.hint().unwrap_or(
                        "tasker_admin grants it with tasker.grant_namespace, or GRANT tasker_worker for every namespace"
                    )
                )
            } else {
                format!("cannot check namespace \"{ns}\": {}", db.message())
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn sslmode_and_sslrootcert_are_taken_out_of_either_form() {
        let (rest, mode, root) =
            take_tls_options("postgres://u:p@db.example:5433/shop?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&application_name=x")
                .unwrap();
        assert_eq!(
            rest,
            "postgres://u:p@db.example:5433/shop?application_name=x"
        );
        assert_eq!(
            (mode.as_deref(), root.as_deref()),
            (Some("verify-full"), Some("/etc/ca.pem"))
        );
        let (_, mode, root) =
            take_tls_options("host=db.example sslmode = 'verify-ca' sslrootcert=/etc/ca.pem")
                .unwrap();
        assert_eq!(
            (mode.as_deref(), root.as_deref()),
            (Some("verify-ca"), Some("/etc/ca.pem"))
        );
        let (rest, mode2, _) =
            take_tls_options(r"host=db.example sslmode=require password='a\'b c'").unwrap();
        assert_eq!(mode2.as_deref(), Some("require"));
        assert_eq!(rest, r"host='db.example' password='a\'b c'");
        let cfg: Config = rest.parse().unwrap();
        assert_eq!(cfg.get_password(), Some(&b"a'b c"[..]));
        let (rest, mode, root) = take_tls_options("host=/tmp dbname=x").unwrap();
        assert_eq!(
            (rest.as_str(), mode, root),
            ("host='/tmp' dbname='x'", None, None)
        );
        assert!(take_tls_options("host").is_err());
    }

    #[test]
    fn sslmode_is_checked_and_unix_sockets_use_no_tls() {
        let none = |_: &str| None;
        let e = database_config_with("host=db.example user=u sslmode=verify_full", &none)
            .err()
            .unwrap();
        assert!(e.contains("invalid sslmode"), "{e}");
        let d = database_config_with("host=db.example user=u sslmode=require", &none).unwrap();
        assert_eq!(d.ssl_mode, SslMode::Require);
        assert_eq!(d.get_ssl_mode(), tokio_postgres::config::SslMode::Require);
        let d =
            database_config_with("host=/var/run/postgresql user=u sslmode=require", &none).unwrap();
        assert_eq!(d.get_ssl_mode(), tokio_postgres::config::SslMode::Disable);
        let env = |k: &str| (k == "PGSSLMODE").then(|| "disable".to_string());
        let d = database_config_with("host=db.example user=u", &env).unwrap();
        assert_eq!(d.ssl_mode, SslMode::Disable);
        let e = database_config_with(
            "host=db.example user=u sslmode=verify-full sslrootcert=/nope.pem",
            &none,
        )
        .err()
        .unwrap();
        assert!(e.contains("/nope.pem"), "{e}");
    }

    #[test]
    fn the_environment_fills_what_the_url_leaves_out() {
        let vars = [
            ("PGHOST", "db.example"),
            ("PGPORT", "6543"),
            ("PGUSER", "alice"),
            ("PGPASSWORD", "s3cret"),
            ("PGDATABASE", "shop"),
        ];
        let cfg = database_config_with("", &env(&vars)).unwrap();
        assert_eq!(
            describe(&cfg),
            "host=db.example port=6543 dbname=shop user=alice"
        );
        assert_eq!(cfg.get_password(), Some(&b"s3cret"[..]));
        // the URL wins; the password comes from PGPASSWORD when it has none
        let cfg = database_config_with("postgres://bob@other:5433/orders", &env(&vars)).unwrap();
        assert_eq!(
            describe(&cfg),
            "host=other port=5433 dbname=orders user=bob"
        );
        assert_eq!(cfg.get_password(), Some(&b"s3cret"[..]));
        let cfg = database_config_with("postgres://bob:pw@other/orders", &env(&vars)).unwrap();
        assert_eq!(cfg.get_password(), Some(&b"pw"[..]));
        assert!(!describe(&cfg).contains("pw"));
    }

    #[test]
    fn bad_settings_are_explained() {
        let e = database_config_with("", &env(&[("PGPORT", "x"), ("PGUSER", "a")])).unwrap_err();
        assert!(e.contains("PGPORT"), "{e}");
        let e = database_config_with("postgres://a:secretpw@h:notaport/d", &env(&[])).unwrap_err();
        assert!(e.starts_with("invalid database URL"), "{e}");
        assert!(!e.contains("secretpw"), "{e}");
    }

    #[test]
    fn transient_failures_are_retried_and_refusals_are_final() {
        for code in [
            None,
            Some("08006"),
            Some("57P01"),
            Some("57P03"),
            Some("40001"),
            Some("40P01"),
            Some("53300"),
            Some("53200"),
            Some("55P03"),
            Some("57014"),
        ] {
            assert_eq!(classify(code), ErrorClass::Retry, "{code:?}");
        }
        for code in [
            "22023", "22P02", "P0002", "42501", "42704", "23505", "XX000", "55000",
        ] {
            assert_eq!(classify(Some(code)), ErrorClass::Final, "{code}");
        }
    }

    #[test]
    fn versions_of_the_same_minor_are_compatible() {
        let mm: Vec<&str> = env!("CARGO_PKG_VERSION").split('.').collect();
        assert!(compatible(&format!("{}.{}.9", mm[0], mm[1])));
        assert!(!compatible("0.1.0"));
    }
}
