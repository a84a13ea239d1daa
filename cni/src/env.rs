//! The runtime's parameters: `CNI_*` environment variables.

use crate::error::CniError;
use crate::protocol::Pod;
use std::ffi::OsString;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CniCommand {
    Add,
    Del,
    Check,
    Version,
    Status,
    Gc,
}

impl CniCommand {
    pub fn name(self) -> &'static str {
        match self {
            CniCommand::Add => "ADD",
            CniCommand::Del => "DEL",
            CniCommand::Check => "CHECK",
            CniCommand::Version => "VERSION",
            CniCommand::Status => "STATUS",
            CniCommand::Gc => "GC",
        }
    }
}

/// The `CNI_*` variables of one invocation, read through `get` (the process environment, or
/// a map in tests). Empty values count as absent, as in libcni.
#[derive(Debug, Clone)]
pub struct CniEnv {
    pub command: CniCommand,
    pub container_id: Option<String>,
    pub netns: Option<String>,
    pub ifname: Option<String>,
    /// `CNI_ARGS` as key/value pairs, in order.
    pub args: Vec<(String, String)>,
}

fn var(get: &impl Fn(&str) -> Option<OsString>, name: &str) -> Result<Option<String>, CniError> {
    match get(name) {
        None => Ok(None),
        Some(value) => match value.into_string() {
            Ok(value) if value.is_empty() => Ok(None),
            Ok(value) => Ok(Some(value)),
            Err(_) => Err(CniError::InvalidEnv(format!("{name} is not UTF-8"))),
        },
    }
}

/// `CNI_COMMAND`.
pub fn command(get: &impl Fn(&str) -> Option<OsString>) -> Result<CniCommand, CniError> {
    let command = var(get, "CNI_COMMAND")?.ok_or(CniError::MissingEnv {
        var: "CNI_COMMAND",
        command: "every invocation",
    })?;
    Ok(match command.as_str() {
        "ADD" => CniCommand::Add,
        "DEL" => CniCommand::Del,
        "CHECK" => CniCommand::Check,
        "VERSION" => CniCommand::Version,
        "STATUS" => CniCommand::Status,
        "GC" => CniCommand::Gc,
        other => {
            return Err(CniError::InvalidEnv(format!(
                "CNI_COMMAND {other:?} is not one of ADD, DEL, CHECK, VERSION, STATUS, GC"
            )))
        }
    })
}

impl CniEnv {
    /// Reads and checks what `command` needs: CNI_CONTAINERID and CNI_IFNAME for ADD, DEL
    /// and CHECK, CNI_NETNS for ADD and CHECK (on DEL the namespace may be gone already).
    pub fn read(
        command: CniCommand,
        get: &impl Fn(&str) -> Option<OsString>,
    ) -> Result<CniEnv, CniError> {
        let env = CniEnv {
            command,
            container_id: var(get, "CNI_CONTAINERID")?,
            netns: var(get, "CNI_NETNS")?,
            ifname: var(get, "CNI_IFNAME")?,
            args: parse_cni_args(var(get, "CNI_ARGS")?.as_deref().unwrap_or(""))?,
        };
        let required: &[(&'static str, &Option<String>)] = match command {
            CniCommand::Add | CniCommand::Check => &[
                ("CNI_CONTAINERID", &env.container_id),
                ("CNI_IFNAME", &env.ifname),
                ("CNI_NETNS", &env.netns),
            ],
            CniCommand::Del => &[
                ("CNI_CONTAINERID", &env.container_id),
                ("CNI_IFNAME", &env.ifname),
            ],
            CniCommand::Version | CniCommand::Status | CniCommand::Gc => &[],
        };
        if let Some((var, _)) = required.iter().find(|(_, value)| value.is_none()) {
            return Err(CniError::MissingEnv {
                var,
                command: command.name(),
            });
        }
        Ok(env)
    }

    fn arg(&self, key: &str) -> Option<&str> {
        self.args
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    }

    /// The Kubernetes pod, if the runtime named one. Namespace and name are what it takes:
    /// the UID is passed on when present, but its absence (older runtimes) must not make an
    /// enrolled namespace's pod look like a non-Kubernetes container and skip the agent.
    pub fn pod(&self) -> Option<Pod> {
        Some(Pod {
            namespace: self.arg("K8S_POD_NAMESPACE")?.to_owned(),
            name: self.arg("K8S_POD_NAME")?.to_owned(),
            uid: self.arg("K8S_POD_UID").unwrap_or_default().to_owned(),
        })
    }

    /// For messages: the value of a variable known to be present after [`CniEnv::read`].
    pub fn container_id(&self) -> &str {
        self.container_id.as_deref().unwrap_or_default()
    }
}

/// `K1=V1;K2=V2` (values may contain `=`; empty segments are skipped).
pub fn parse_cni_args(args: &str) -> Result<Vec<(String, String)>, CniError> {
    args.split(';')
        .filter(|pair| !pair.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
            _ => Err(CniError::InvalidEnv(format!(
                "CNI_ARGS: {pair:?} is not KEY=VALUE"
            ))),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn lookup(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| vars.get(name).map(OsString::from)
    }

    #[test]
    fn cni_args() {
        let args = parse_cni_args(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;\
             K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=u-1;X=a=b;;",
        )
        .unwrap();
        assert_eq!(args.len(), 6);
        assert_eq!(args[5], ("X".into(), "a=b".into()));
        assert!(parse_cni_args("").unwrap().is_empty());
        assert_eq!(parse_cni_args("A=1;B").unwrap_err().code(), 4);
        assert_eq!(parse_cni_args("=1").unwrap_err().code(), 4);
    }

    #[test]
    fn pod_from_args() {
        let get = lookup(&[
            ("CNI_CONTAINERID", "c"),
            ("CNI_IFNAME", "eth0"),
            (
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_UID=u-1",
            ),
        ]);
        let env = CniEnv::read(CniCommand::Del, &get).unwrap();
        assert_eq!(
            env.pod(),
            Some(Pod {
                namespace: "shop".into(),
                name: "web-0".into(),
                uid: "u-1".into()
            })
        );
        let no_uid = lookup(&[
            ("CNI_CONTAINERID", "c"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0"),
        ]);
        let env = CniEnv::read(CniCommand::Del, &no_uid).unwrap();
        assert_eq!(env.pod().unwrap().uid, "");
        for args in [
            "IgnoreUnknown=1",
            "K8S_POD_NAME=web-0",
            "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=",
        ] {
            let get = lookup(&[
                ("CNI_CONTAINERID", "c"),
                ("CNI_IFNAME", "eth0"),
                ("CNI_ARGS", args),
            ]);
            assert_eq!(
                CniEnv::read(CniCommand::Del, &get).unwrap().pod(),
                None,
                "{args}"
            );
        }
    }

    #[test]
    fn commands() {
        assert_eq!(
            command(&lookup(&[("CNI_COMMAND", "GC")])).unwrap(),
            CniCommand::Gc
        );
        assert_eq!(command(&lookup(&[])).unwrap_err().code(), 4);
        assert_eq!(
            command(&lookup(&[("CNI_COMMAND", "")])).unwrap_err().code(),
            4
        );
        assert_eq!(
            command(&lookup(&[("CNI_COMMAND", "add")]))
                .unwrap_err()
                .code(),
            4
        );
    }

    #[test]
    fn required_variables() {
        let all = [
            ("CNI_CONTAINERID", "c"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", "/var/run/netns/x"),
        ];
        for command in [CniCommand::Add, CniCommand::Check, CniCommand::Del] {
            assert!(CniEnv::read(command, &lookup(&all)).is_ok());
            for missing in 0..all.len() {
                let vars: Vec<_> = all
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| *i != missing)
                    .map(|(_, v)| *v)
                    .collect();
                let result = CniEnv::read(command, &lookup(&vars));
                let netns_optional = command == CniCommand::Del && all[missing].0 == "CNI_NETNS";
                assert_eq!(
                    result.is_ok(),
                    netns_optional,
                    "{command:?} without {}",
                    all[missing].0
                );
            }
        }
        assert!(CniEnv::read(CniCommand::Status, &lookup(&[])).is_ok());
        let bad_args = lookup(&[("CNI_COMMAND", "GC"), ("CNI_ARGS", "junk")]);
        assert_eq!(
            CniEnv::read(CniCommand::Gc, &bad_args).unwrap_err().code(),
            4
        );
    }

    #[test]
    fn non_utf8_is_invalid_env() {
        use std::os::unix::ffi::OsStringExt;
        let get = |name: &str| (name == "CNI_COMMAND").then(|| OsString::from_vec(vec![0xff]));
        assert_eq!(command(&get).unwrap_err().code(), 4);
    }
}
