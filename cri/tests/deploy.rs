//! What `deploy/` ships, checked against the code it configures: the default
//! config against `Config` (same values, every key present), the CNI bridge
//! network against corrald's loader and Debian's real plugins, the unit
//! against systemd, and `install.sh` by staging a node under a temporary
//! `DESTDIR`. Needs root (network namespaces, iptables) and Debian's runc,
//! containernetworking-plugins and iptables, as the CI installs them.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use corral_cri::cni::{network_status, NetworkStatus};
use corral_cri::Config;
use serde_json::{json, Value as Json};
use serde_norway::Value as Yaml;

const CNI_BIN_DIR: &str = "/usr/lib/cni";

fn deploy(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(file)
}

fn read(file: &str) -> String {
    fs::read_to_string(deploy(file)).unwrap()
}

fn run(command: &mut Command) -> Output {
    let output = command.output().unwrap();
    assert!(
        output.status.success(),
        "{command:?}: {}\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

// ---------------------------------------------------------------- config.yaml

#[test]
fn the_shipped_config_is_the_default_config() {
    let config = Config::load(&deploy("config.yaml")).unwrap();
    assert_eq!(config, Config::default());
}

/// Every key `Config` accepts appears in the shipped file: the keys with a
/// single value as live YAML, the keys of `runtimes` and `registries`
/// entries in the example blocks under them. The accepted keys come from
/// the type itself (see [`accepted_keys`]), so a key added to `Config`
/// fails this test until the file documents it.
#[test]
fn the_shipped_config_shows_every_key() {
    let shape = shape_at(&[]);
    let accepted = shape.paths("");
    assert!(accepted.contains("cni.bin_dirs"), "{accepted:?}");
    assert!(
        accepted.contains("registries.*.auth.password"),
        "{accepted:?}"
    );

    let text = read("config.yaml");
    let live = shape.keys_in(&serde_norway::from_str(&text).unwrap());
    let single: BTreeSet<String> = accepted
        .iter()
        .filter(|p| !p.contains('*'))
        .cloned()
        .collect();
    assert_eq!(live, single, "live keys of deploy/config.yaml");

    let (examples, uncommented) = uncomment_examples(&text);
    assert!(uncommented > 0, "no example blocks found");
    let all = shape.keys_in(&serde_norway::from_str(&examples).unwrap());
    assert_eq!(
        all, accepted,
        "keys of deploy/config.yaml with its examples"
    );
}

#[test]
fn the_config_examples_are_valid_when_uncommented() {
    let (examples, _) = uncomment_examples(&read("config.yaml"));
    let config = Config::from_yaml(&examples, "deploy/config.yaml, uncommented").unwrap();

    let handlers = config.handlers().unwrap();
    assert_eq!(
        handlers.get("runc-v2").unwrap().shim,
        "io.containerd.runc.v2"
    );
    assert_eq!(handlers.get("").unwrap().shim, "io.containerd.corral.v2");
    let registries = config.registry_config();
    let with =
        |what: fn(&corral_runtime::image::HostConfig) -> bool| registries.hosts.values().any(what);
    assert!(with(|h| !h.mirrors.is_empty()), "a mirror example");
    assert!(with(|h| h.insecure == Some(true)), "an insecure example");
    assert!(with(|h| h.auth.is_some()), "an auth example");
    assert!(with(|h| h.ca_file.is_some()), "a ca_file example");
}

/// The example blocks: the `#` lines right under a key that has no value
/// of its own, minus their first `#`, as the file's header tells operators.
fn uncomment_examples(text: &str) -> (String, usize) {
    let mut out = String::new();
    let mut in_block = false;
    let mut uncommented = 0;
    for line in text.lines() {
        if in_block && line.starts_with('#') {
            out.push_str(&line[1..]);
            uncommented += 1;
        } else {
            let code = line.trim_end();
            in_block = code.ends_with(':') && !code.trim_start().starts_with('#');
            out.push_str(line);
        }
        out.push('\n');
    }
    (out, uncommented)
}

/// The key structure of `Config`, read from its deserializer: a struct
/// refuses an unknown key by listing the keys it accepts.
#[derive(Debug)]
enum Shape {
    Leaf,
    Struct(BTreeMap<String, Shape>),
    /// A map of named entries (`runtimes`, `registries`), keyed `*` here.
    Entries(Box<Shape>),
}

const PROBE: &str = "__corral_probe";
const ENTRY: &str = "__corral_entry";

/// The shape of the value at `path`, found by giving it `{PROBE: 1}`.
fn shape_at(path: &[&str]) -> Shape {
    let document = path
        .iter()
        .rev()
        .fold(format!("{{{PROBE}: 1}}"), |inner, key| {
            format!("{{{key}: {inner}}}")
        });
    let message = match Config::from_yaml(&document, "probe") {
        Ok(config) => panic!("{document} was accepted: {config:?}"),
        Err(e) => e.to_string(),
    };
    if let Some(expected) = message
        .split(&format!("unknown field `{PROBE}`, expected "))
        .nth(1)
    {
        // `a`, or `a` or `b`, or one of `a`, `b`, `c`: every other piece.
        let fields = expected.split('`').skip(1).step_by(2);
        Shape::Struct(
            fields
                .map(|field| {
                    let mut inner = path.to_vec();
                    inner.push(field);
                    (field.to_string(), shape_at(&inner))
                })
                .collect(),
        )
    } else if message.contains("expected struct") {
        // The probe key was taken as an entry's name and `1` refused as
        // its value.
        let mut inner = path.to_vec();
        inner.push(ENTRY);
        Shape::Entries(Box::new(shape_at(&inner)))
    } else {
        Shape::Leaf
    }
}

impl Shape {
    /// Every key path this shape accepts: `cni.conf_dir`, `runtimes.*.shim`.
    fn paths(&self, prefix: &str) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        match self {
            Shape::Leaf => {}
            Shape::Struct(fields) => {
                for (name, shape) in fields {
                    let path = join(prefix, name);
                    out.extend(shape.paths(&path));
                    out.insert(path);
                }
            }
            Shape::Entries(shape) => {
                let path = join(prefix, "*");
                out.extend(shape.paths(&path));
                out.insert(path);
            }
        }
        out
    }

    /// The key paths a YAML document sets, in the same notation.
    fn keys_in(&self, value: &Yaml) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        self.collect(value, "", &mut out);
        out
    }

    fn collect(&self, value: &Yaml, prefix: &str, out: &mut BTreeSet<String>) {
        let Some(map) = value.as_mapping() else {
            return;
        };
        for (key, value) in map {
            let key = key.as_str().unwrap_or("<not a string>");
            let (path, shape) = match self {
                Shape::Leaf => return,
                Shape::Struct(fields) => (join(prefix, key), fields.get(key)),
                Shape::Entries(shape) => (join(prefix, "*"), Some(&**shape)),
            };
            if let Some(shape) = shape {
                shape.collect(value, &path, out);
            }
            out.insert(path);
        }
    }
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

// ------------------------------------------------------ cni/10-corral-bridge

fn conflist() -> Json {
    serde_json::from_str(&read("cni/10-corral-bridge.conflist")).unwrap()
}

#[test]
fn the_bridge_network_makes_the_node_network_ready() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("10-corral-bridge.conflist");
    fs::copy(deploy("cni/10-corral-bridge.conflist"), &file).unwrap();
    assert_eq!(
        network_status(dir.path()),
        NetworkStatus::Ready {
            file,
            name: conflist()["name"].as_str().unwrap().to_string(),
        }
    );
}

#[test]
fn the_bridge_network_uses_plugins_and_a_version_debian_ships() {
    let conf = conflist();
    let version = conf["cniVersion"].as_str().unwrap();
    for plugin in conf["plugins"].as_array().unwrap() {
        let kind = plugin["type"].as_str().unwrap();
        let output = run(Command::new(Path::new(CNI_BIN_DIR).join(kind))
            .env("CNI_COMMAND", "VERSION")
            .stdin(Stdio::null()));
        let answer: Json = serde_json::from_slice(&output.stdout).unwrap();
        let supported = answer["supportedVersions"].as_array().unwrap();
        assert!(
            supported.iter().any(|v| v == version),
            "{kind} does not support cniVersion {version}: {answer}"
        );
    }
}

/// The shipped plugin chain, run with Debian's plugins as corrald runs it:
/// ADD gives the pod an address, a host port and a bandwidth limit, DEL
/// takes them away. On its own bridge, subnet and IPAM directory, so it
/// runs beside other tests and a live corral0.
#[test]
fn the_bridge_network_gives_a_pod_an_address_a_host_port_and_a_limit() {
    let pid = std::process::id();
    let ipam = tempfile::tempdir().unwrap();
    let mut conf = conflist();
    let bridge = format!("crdeploy{}", pid % 100_000);
    let subnet_prefix = format!("10.251.{}.", pid % 250);
    conf["name"] = json!(format!("corral-deploy-{pid}"));
    let first = &mut conf["plugins"][0];
    first["bridge"] = json!(bridge);
    first["ipam"]["ranges"] = json!([[{ "subnet": format!("{subnet_prefix}0/24") }]]);
    first["ipam"]["dataDir"] = json!(ipam.path());

    let host_port = 20_000 + pid % 10_000;
    let runtime_config = json!({
        "portMappings": [{ "hostPort": host_port, "containerPort": 80, "protocol": "tcp" }],
        "bandwidth": { "ingressRate": 1_000_000, "ingressBurst": 100_000 },
    });
    let mut pod = Pod::new(
        &format!("corral-deploy-{pid}"),
        &bridge,
        conf,
        runtime_config,
    );

    let result = pod.add();
    let pod_ips =
        run(Command::new("ip").args(["-n", &pod.netns, "-4", "-o", "addr", "show", "eth0"]));
    let pod_ips = String::from_utf8_lossy(&pod_ips.stdout);
    assert!(pod_ips.contains(&subnet_prefix), "{pod_ips}");
    assert!(
        nat_rules().contains(&format!("--dport {host_port}")),
        "no DNAT rule for the host port"
    );
    let host_veth = result["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i.get("sandbox").is_none() && i["name"] != json!(bridge))
        .and_then(|i| i["name"].as_str())
        .unwrap()
        .to_string();
    let qdiscs = run(Command::new("tc").args(["qdisc", "show", "dev", &host_veth]));
    assert!(
        String::from_utf8_lossy(&qdiscs.stdout).contains("tbf"),
        "no rate limit on {host_veth}"
    );

    pod.del();
    assert!(
        !nat_rules().contains(&format!("--dport {host_port}")),
        "DNAT rule left behind"
    );
    let links = run(Command::new("ip").args(["-o", "link", "show"]));
    assert!(!String::from_utf8_lossy(&links.stdout).contains(&format!("{host_veth}@")));
}

fn nat_rules() -> String {
    String::from_utf8_lossy(&run(Command::new("iptables").args(["-t", "nat", "-S"])).stdout)
        .into_owned()
}

/// A network namespace with the chain added to it; dropping it runs DEL
/// (if not done yet) and removes the namespace and the bridge.
struct Pod {
    netns: String,
    bridge: String,
    conf: Json,
    runtime_config: Json,
    added: Option<Json>,
}

impl Pod {
    fn new(netns: &str, bridge: &str, conf: Json, runtime_config: Json) -> Pod {
        run(Command::new("ip").args(["netns", "add", netns]));
        Pod {
            netns: netns.to_string(),
            bridge: bridge.to_string(),
            conf,
            runtime_config,
            added: None,
        }
    }

    fn add(&mut self) -> Json {
        let mut result = None;
        for plugin in self.conf["plugins"].as_array().unwrap().clone() {
            let next = self.invoke("ADD", &plugin, result.as_ref()).unwrap();
            // Recorded at once: a later plugin's failure still leaves DEL
            // to run in the drop.
            self.added = Some(next.clone());
            result = Some(next);
        }
        result.unwrap()
    }

    fn del(&mut self) {
        if let Some(result) = self.added.take() {
            for plugin in self.conf["plugins"]
                .as_array()
                .unwrap()
                .clone()
                .iter()
                .rev()
            {
                self.invoke("DEL", plugin, Some(&result)).unwrap();
            }
        }
    }

    /// One plugin, given what libcni gives it: the list's name and version,
    /// the runtime config its capabilities ask for, the previous result.
    fn invoke(&self, command: &str, plugin: &Json, prev: Option<&Json>) -> Result<Json, String> {
        let mut conf = plugin.clone();
        conf["name"] = self.conf["name"].clone();
        conf["cniVersion"] = self.conf["cniVersion"].clone();
        if let Some(capabilities) = plugin.get("capabilities").and_then(Json::as_object) {
            let wanted: serde_json::Map<String, Json> = capabilities
                .iter()
                .filter(|(_, on)| on.as_bool() == Some(true))
                .filter_map(|(name, _)| {
                    Some((name.clone(), self.runtime_config.get(name)?.clone()))
                })
                .collect();
            conf["runtimeConfig"] = Json::Object(wanted);
        }
        if let Some(prev) = prev {
            conf["prevResult"] = prev.clone();
        }
        let kind = plugin["type"].as_str().unwrap();
        let mut child = Command::new(Path::new(CNI_BIN_DIR).join(kind))
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &self.netns)
            .env("CNI_NETNS", format!("/run/netns/{}", self.netns))
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", CNI_BIN_DIR)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("{kind}: {e}"))?;
        let stdin = child.stdin.take().unwrap();
        serde_json::to_writer(stdin, &conf).map_err(|e| e.to_string())?;
        let output = child.wait_with_output().map_err(|e| e.to_string())?;
        if !output.status.success() {
            return Err(format!(
                "{command} {kind}: {}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        if command == "ADD" {
            serde_json::from_slice(&output.stdout).map_err(|e| format!("{kind}: {e}"))
        } else {
            Ok(Json::Null)
        }
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        if let Some(result) = self.added.take() {
            for plugin in self.conf["plugins"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .rev()
            {
                let _ = self.invoke("DEL", plugin, Some(&result));
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .stderr(Stdio::null())
            .status();
    }
}

// ------------------------------------------------------------ corrald.service

#[test]
fn the_unit_runs_corrald_with_the_shipped_config_path_and_leaves_shims_running() {
    let unit = read("corrald.service");
    let lines: BTreeSet<&str> = unit.lines().map(str::trim).collect();
    for line in [
        // install.sh rewrites this path for --prefix.
        "ExecStart=/usr/local/bin/corrald --config /etc/corral/config.yaml",
        "KillMode=process",
        "Delegate=yes",
        "Restart=always",
    ] {
        assert!(
            lines.contains(line),
            "no {line:?} in deploy/corrald.service"
        );
    }
}

#[test]
fn systemd_accepts_the_unit() {
    if !have("systemd-analyze") {
        eprintln!("systemd-analyze is not installed; skipped");
        return;
    }
    // verify wants ExecStart's binary to exist: a stand-in with the same
    // arguments.
    let dir = tempfile::tempdir().unwrap();
    let unit = read("corrald.service").replace("/usr/local/bin/corrald", "/bin/true");
    let path = dir.path().join("corrald.service");
    fs::write(&path, unit).unwrap();
    run(Command::new("systemd-analyze").arg("verify").arg(&path));
}

// ----------------------------------------------------------------- install.sh

#[test]
fn the_install_script_is_valid_bash_and_shellcheck_clean() {
    run(Command::new("bash").arg("-n").arg(deploy("install.sh")));
    if have("shellcheck") {
        run(Command::new("shellcheck").arg(deploy("install.sh")));
    } else {
        eprintln!("shellcheck is not installed; only bash -n ran");
    }
}

/// A node staged under a temporary DESTDIR, twice: the first run installs
/// everything, the second changes nothing, an operator's config survives,
/// and a changed binary is replaced.
#[test]
fn the_install_script_stages_a_node_and_is_idempotent() {
    let work = tempfile::tempdir().unwrap();
    let bins = work.path().join("bin");
    let root = work.path().join("root");
    fs::create_dir(&bins).unwrap();
    for name in ["corrald", "containerd-shim-corral-v2"] {
        write_executable(&bins.join(name), &format!("#!/bin/sh\necho {name}\n"));
    }

    let first = install(&bins, &root, &["--prefix", "/opt/corral"]);
    for (staged, shipped) in [
        ("etc/corral/config.yaml", deploy("config.yaml")),
        (
            "etc/cni/net.d/10-corral-bridge.conflist",
            deploy("cni/10-corral-bridge.conflist"),
        ),
        ("opt/corral/bin/corrald", bins.join("corrald")),
        (
            "opt/corral/bin/containerd-shim-corral-v2",
            bins.join("containerd-shim-corral-v2"),
        ),
    ] {
        assert_eq!(
            fs::read(root.join(staged)).unwrap(),
            fs::read(shipped).unwrap(),
            "{staged}"
        );
    }
    let mode = fs::metadata(root.join("opt/corral/bin/corrald"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o755);
    let unit = fs::read_to_string(root.join("etc/systemd/system/corrald.service")).unwrap();
    assert!(
        unit.contains("\nExecStart=/opt/corral/bin/corrald --config /etc/corral/config.yaml\n"),
        "{unit}"
    );
    assert!(
        unit.contains("\nEnvironment=PATH=/opt/corral/bin:"),
        "{unit}"
    );
    assert!(first.contains("systemd left alone"), "{first}");

    let again = install(&bins, &root, &["--prefix", "/opt/corral"]);
    assert!(
        !again.contains("installed:"),
        "a second run changed something:\n{again}"
    );
    assert!(again.contains("kept: /etc/corral/config.yaml"), "{again}");

    let operators = "log_level: debug\n";
    fs::write(root.join("etc/corral/config.yaml"), operators).unwrap();
    write_executable(&bins.join("corrald"), "#!/bin/sh\necho corrald 2\n");
    let upgrade = install(&bins, &root, &["--prefix", "/opt/corral"]);
    assert_eq!(
        fs::read_to_string(root.join("etc/corral/config.yaml")).unwrap(),
        operators
    );
    assert_eq!(
        fs::read(root.join("opt/corral/bin/corrald")).unwrap(),
        fs::read(bins.join("corrald")).unwrap()
    );
    assert!(upgrade.contains("installed:"), "{upgrade}");
    let leftovers: Vec<_> = fs::read_dir(root.join("opt/corral/bin"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().contains(".new."))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn the_install_script_leaves_an_existing_cni_network_alone() {
    let work = tempfile::tempdir().unwrap();
    let bins = work.path().join("bin");
    let root = work.path().join("root");
    fs::create_dir(&bins).unwrap();
    for name in ["corrald", "containerd-shim-corral-v2"] {
        write_executable(&bins.join(name), "#!/bin/sh\n");
    }
    let net_d = root.join("etc/cni/net.d");
    fs::create_dir_all(&net_d).unwrap();
    fs::write(net_d.join("10-flannel.conflist"), "{}").unwrap();

    let output = install(&bins, &root, &[]);
    assert!(
        output.contains("kept the node's CNI configuration"),
        "{output}"
    );
    assert!(!net_d.join("10-corral-bridge.conflist").exists());
    // The default prefix needs no PATH: systemd's holds /usr/local/bin.
    let unit = fs::read_to_string(root.join("etc/systemd/system/corrald.service")).unwrap();
    assert_eq!(unit, read("corrald.service"));
}

#[test]
fn the_install_script_refuses_bad_arguments() {
    for args in [&["--prefix", "relative"][..], &["--bogus"], &["--prefix"]] {
        let output = Command::new("bash")
            .arg(deploy("install.sh"))
            .args(args)
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(2), "{args:?}");
    }
}

fn install(bins: &Path, root: &Path, args: &[&str]) -> String {
    let output = run(Command::new("bash")
        .arg(deploy("install.sh"))
        .args(args)
        .env("CORRAL_BIN_DIR", bins)
        .env("DESTDIR", root));
    String::from_utf8(output.stdout).unwrap()
}

fn write_executable(path: &Path, text: &str) {
    fs::write(path, text).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
}
