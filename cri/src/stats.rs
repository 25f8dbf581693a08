//! Container and pod statistics: the cgroup metrics a shim reports,
//! translated into CRI's CPU, memory and writable-layer figures.
//!
//! Owns the decoding of the shims' cgroup v1 and v2 metric messages and the
//! CPU rate (nano-cores), which needs the previous sample of each container.
//! It does not read cgroup files itself: the shim that owns the cgroup does.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use corral_runtime::image::Usage;

use corral_proto::containerd::cgroups::metrics as v1;
use corral_proto::containerd::cgroups_v2::metrics as v2;
use corral_proto::protobuf::{well_known_types::any::Any, Message};
use k8s_cri::v1 as cri;

use crate::netns::NetNs;
use crate::node::{now_ns, Container, Node, Sandbox, TASK_NAMESPACE};
use crate::store::{ContainerState, SandboxState};

/// What one cgroup sample says, in CRI's units.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sample {
    /// Cumulative CPU time, nanoseconds.
    pub cpu_ns: u64,
    pub memory_usage: u64,
    pub working_set: u64,
    pub rss: u64,
    pub page_faults: u64,
    pub major_page_faults: u64,
    /// Processes and threads in the cgroup (`pids.current`).
    pub processes: u64,
}

/// Decodes the shim's metrics (`io.containerd.cgroups.v1.Metrics` or `.v2.`).
pub fn decode(any: &Any) -> Option<Sample> {
    if any.type_url.ends_with("cgroups.v1.Metrics") {
        let m = v1::Metrics::parse_from_bytes(&any.value).ok()?;
        let cpu_ns = m.cpu.usage.total;
        let mem = &m.memory;
        let usage = mem.usage.usage;
        // Working set as kubelet and cAdvisor define it: usage minus the
        // page cache the kernel can drop at once.
        let working_set = usage.saturating_sub(mem.total_inactive_file);
        Some(Sample {
            cpu_ns,
            memory_usage: usage,
            working_set,
            rss: mem.total_rss,
            page_faults: mem.total_pg_fault,
            major_page_faults: mem.total_pg_maj_fault,
            processes: m.pids.current,
        })
    } else if any.type_url.ends_with("cgroups.v2.Metrics") {
        let m = v2::Metrics::parse_from_bytes(&any.value).ok()?;
        let mem = &m.memory;
        Some(Sample {
            cpu_ns: m.cpu.usage_usec.saturating_mul(1000),
            memory_usage: mem.usage,
            working_set: mem.usage.saturating_sub(mem.inactive_file),
            rss: mem.anon,
            page_faults: mem.pgfault,
            major_page_faults: mem.pgmajfault,
            processes: m.pids.current,
        })
    } else {
        None
    }
}

/// The previous CPU sample per container, for the nano-cores rate.
#[derive(Debug, Default)]
pub struct CpuRates {
    last: Mutex<HashMap<String, (i64, u64)>>,
}

impl CpuRates {
    /// Nano-cores since the previous sample of `id`; `None` for the first.
    pub fn rate(&self, id: &str, at: i64, cpu_ns: u64) -> Option<u64> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let previous = last.insert(id.to_string(), (at, cpu_ns));
        let (t0, c0) = previous?;
        let elapsed = at.checked_sub(t0).filter(|d| *d > 0)? as u128;
        let used = cpu_ns.checked_sub(c0)? as u128;
        Some((used * 1_000_000_000 / elapsed) as u64)
    }

    pub fn forget(&self, id: &str) {
        self.last
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }
}

/// How long a writable layer's measured size is reused: measuring walks
/// the whole upper directory, and kubelet asks for every container's stats
/// every few seconds (containerd re-measures every 10 s too).
const LAYER_USAGE_TTL: Duration = Duration::from_secs(10);

/// The last measured size of each container's writable layer.
#[derive(Debug, Default)]
pub struct LayerUsage {
    last: Mutex<HashMap<String, (Instant, Usage)>>,
}

impl LayerUsage {
    fn fresh(&self, id: &str, now: Instant) -> Option<Usage> {
        let last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        last.get(id)
            .filter(|(at, _)| now.duration_since(*at) < LAYER_USAGE_TTL)
            .map(|(_, usage)| *usage)
    }

    fn store(&self, id: &str, now: Instant, usage: Usage) {
        self.last
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_string(), (now, usage));
    }

    pub fn forget(&self, id: &str) {
        self.last
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }
}

/// The container's writable layer size, measured off the async threads at
/// most every [`LAYER_USAGE_TTL`].
async fn layer_usage(node: &Node, c: &Container) -> Usage {
    let now = Instant::now();
    if let Some(usage) = node.layer_usage.fresh(&c.id, now) {
        return usage;
    }
    let images = node.images.clone();
    let key = c.snapshot().snapshot;
    let usage = tokio::task::spawn_blocking(move || images.snapshots().usage(&key))
        .await
        .ok()
        .and_then(|r| r.ok())
        .unwrap_or_default();
    node.layer_usage.store(&c.id, now, usage);
    usage
}

fn value(v: u64) -> Option<cri::UInt64Value> {
    Some(cri::UInt64Value { value: v })
}

/// ContainerStats for one container. A container without a running task
/// reports zero usage with current timestamps, as kubelet expects of
/// containers that are created or exited.
pub async fn container_stats(node: &Node, c: &Container) -> cri::ContainerStats {
    sampled_container_stats(node, c).await.0
}

/// ContainerStats, and the sample they came from.
async fn sampled_container_stats(node: &Node, c: &Container) -> (cri::ContainerStats, Sample) {
    let at = now_ns();
    let running = c.record().state == ContainerState::Running;
    let sample = if running {
        match node.tasks.stats(TASK_NAMESPACE, &c.id).await {
            Ok(any) => decode(&any),
            Err(e) => {
                tracing::debug!(container = %c.id, error = %e, "no stats from the shim");
                None
            }
        }
    } else {
        None
    };
    let sample = sample.unwrap_or_default();
    let nano_cores = node.cpu_rates.rate(&c.id, at, sample.cpu_ns);
    let writable = layer_usage(node, c).await;
    let stats = cri::ContainerStats {
        attributes: Some(cri::ContainerAttributes {
            id: c.id.clone(),
            metadata: c.config.metadata.clone(),
            labels: c.config.labels.clone(),
            annotations: c.config.annotations.clone(),
        }),
        cpu: Some(cri::CpuUsage {
            timestamp: at,
            usage_core_nano_seconds: value(sample.cpu_ns),
            usage_nano_cores: nano_cores.and_then(value),
        }),
        memory: Some(memory(at, &sample)),
        writable_layer: Some(cri::FilesystemUsage {
            timestamp: at,
            fs_id: Some(cri::FilesystemIdentifier {
                mountpoint: node.images.snapshots().root().display().to_string(),
            }),
            used_bytes: value(writable.bytes),
            inodes_used: value(writable.inodes),
        }),
        swap: None,
    };
    (stats, sample)
}

fn memory(at: i64, s: &Sample) -> cri::MemoryUsage {
    cri::MemoryUsage {
        timestamp: at,
        working_set_bytes: value(s.working_set),
        available_bytes: None,
        usage_bytes: value(s.memory_usage),
        rss_bytes: value(s.rss),
        page_faults: value(s.page_faults),
        major_page_faults: value(s.major_page_faults),
    }
}

/// PodSandboxStats: the pod's containers, and their sum as the pod's usage
/// (the pause process's own is negligible and not sampled, but it counts
/// as one process, as containerd counts the sandbox task's).
pub async fn sandbox_stats(node: &Node, s: &Sandbox) -> cri::PodSandboxStats {
    let at = now_ns();
    let mut containers = Vec::new();
    let mut processes = u64::from(s.record().state == SandboxState::Ready);
    for c in node.containers_of(&s.id) {
        let (stats, sample) = sampled_container_stats(node, &c).await;
        processes += sample.processes;
        containers.push(stats);
    }
    let sum = |f: fn(&cri::ContainerStats) -> Option<u64>| -> u64 {
        containers.iter().filter_map(f).sum()
    };
    let cpu_ns = sum(|c| Some(c.cpu.as_ref()?.usage_core_nano_seconds.as_ref()?.value));
    let nano_cores = sum(|c| Some(c.cpu.as_ref()?.usage_nano_cores.as_ref()?.value));
    let mem = |f: fn(&cri::MemoryUsage) -> Option<&cri::UInt64Value>| -> u64 {
        containers
            .iter()
            .filter_map(|c| Some(f(c.memory.as_ref()?)?.value))
            .sum()
    };
    let sample = Sample {
        cpu_ns,
        memory_usage: mem(|m| m.usage_bytes.as_ref()),
        working_set: mem(|m| m.working_set_bytes.as_ref()),
        rss: mem(|m| m.rss_bytes.as_ref()),
        page_faults: mem(|m| m.page_faults.as_ref()),
        major_page_faults: mem(|m| m.major_page_faults.as_ref()),
        processes,
    };
    cri::PodSandboxStats {
        attributes: Some(cri::PodSandboxAttributes {
            id: s.id.clone(),
            metadata: s.config.metadata.clone(),
            labels: s.config.labels.clone(),
            annotations: s.config.annotations.clone(),
        }),
        linux: Some(cri::LinuxPodSandboxStats {
            cpu: Some(cri::CpuUsage {
                timestamp: at,
                usage_core_nano_seconds: value(cpu_ns),
                usage_nano_cores: value(nano_cores),
            }),
            memory: Some(memory(at, &sample)),
            network: network_usage(s, at).await,
            process: Some(cri::ProcessUsage {
                timestamp: at,
                process_count: value(sample.processes),
            }),
            containers,
        }),
        windows: None,
    }
}

/// The interface CNI makes in the pod (`CNI_IFNAME`), which kubelet
/// reports as the pod's network usage, as containerd and CRI-O do.
const DEFAULT_INTERFACE: &str = "eth0";

/// The counters of one interface in `/proc/net/dev`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceCounters {
    pub name: String,
    pub rx_bytes: u64,
    pub rx_errors: u64,
    pub tx_bytes: u64,
    pub tx_errors: u64,
}

/// The interfaces of a `/proc/net/dev` text, `lo` left out (kubelet sums
/// the pod's interfaces; loopback traffic never leaves the pod). Lines that
/// do not parse are skipped: the file is the kernel's, but a format change
/// must not take the pod's other figures with it.
pub fn parse_net_dev(text: &str) -> Vec<InterfaceCounters> {
    text.lines()
        .filter_map(|line| {
            let (name, counters) = line.split_once(':')?;
            let name = name.trim();
            let fields: Vec<u64> = counters
                .split_whitespace()
                .map(str::parse)
                .collect::<Result<_, _>>()
                .ok()?;
            // 8 receive columns (bytes packets errs drop fifo frame
            // compressed multicast), then 8 transmit ones.
            if name.is_empty() || name == "lo" || fields.len() < 16 {
                return None;
            }
            Some(InterfaceCounters {
                name: name.to_string(),
                rx_bytes: fields[0],
                rx_errors: fields[2],
                tx_bytes: fields[8],
                tx_errors: fields[10],
            })
        })
        .collect()
}

/// The counters of the pod's interfaces, read in its network namespace.
fn read_interfaces(netns: PathBuf) -> Result<Vec<InterfaceCounters>, String> {
    let ns = NetNs::open(netns).map_err(|e| e.to_string())?;
    // `/proc/thread-self/net` is the calling thread's namespace: the one
    // `run` entered. `/sys/class/net` would show the daemon's own.
    let text = ns
        .run(|| std::fs::read_to_string("/proc/thread-self/net/dev"))
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("read /proc/thread-self/net/dev: {e}"))?;
    Ok(parse_net_dev(&text))
}

/// The pod's network usage: `eth0` as the default interface, every other
/// interface but `lo` listed too. None for a pod on the host's network
/// (the node's traffic is not the pod's) or when the namespace cannot be
/// read (stats are best effort; the pod's other figures still count).
async fn network_usage(s: &Sandbox, at: i64) -> Option<cri::NetworkUsage> {
    let netns = s.snapshot().netns?;
    let read = tokio::task::spawn_blocking(move || read_interfaces(netns)).await;
    let interfaces = match read {
        Ok(Ok(interfaces)) => interfaces,
        Ok(Err(e)) => {
            tracing::debug!(sandbox = %s.id, error = %e, "no network stats");
            return None;
        }
        Err(e) => {
            tracing::debug!(sandbox = %s.id, error = %e, "network stats task failed");
            return None;
        }
    };
    let usage = |i: &InterfaceCounters| cri::NetworkInterfaceUsage {
        name: i.name.clone(),
        rx_bytes: value(i.rx_bytes),
        rx_errors: value(i.rx_errors),
        tx_bytes: value(i.tx_bytes),
        tx_errors: value(i.tx_errors),
    };
    Some(cri::NetworkUsage {
        timestamp: at,
        default_interface: interfaces
            .iter()
            .find(|i| i.name == DEFAULT_INTERFACE)
            .map(usage),
        interfaces: interfaces.iter().map(usage).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_metrics_decode_with_kubelets_working_set() {
        let mut m = v1::Metrics::new();
        m.mut_cpu().mut_usage().total = 5_000;
        m.mut_memory().mut_usage().usage = 10_000;
        m.mut_memory().total_inactive_file = 4_000;
        m.mut_memory().total_rss = 3_000;
        m.mut_pids().current = 4;
        let any = Any {
            type_url: "io.containerd.cgroups.v1.Metrics".into(),
            value: m.write_to_bytes().unwrap(),
            ..Default::default()
        };
        let s = decode(&any).unwrap();
        assert_eq!(s.cpu_ns, 5_000);
        assert_eq!(s.working_set, 6_000);
        assert_eq!(s.rss, 3_000);
        assert_eq!(s.processes, 4);
    }

    #[test]
    fn v2_metrics_decode_cpu_in_nanoseconds() {
        let mut m = v2::Metrics::new();
        m.mut_cpu().usage_usec = 7;
        m.mut_memory().usage = 100;
        m.mut_memory().inactive_file = 30;
        m.mut_pids().current = 2;
        let any = Any {
            type_url: "io.containerd.cgroups.v2.Metrics".into(),
            value: m.write_to_bytes().unwrap(),
            ..Default::default()
        };
        let s = decode(&any).unwrap();
        assert_eq!(s.cpu_ns, 7_000);
        assert_eq!(s.working_set, 70);
        assert_eq!(s.processes, 2);
        assert!(decode(&Any::default()).is_none());
    }

    #[test]
    fn a_layer_size_is_reused_for_its_ttl_and_forgotten_on_removal() {
        let cache = LayerUsage::default();
        let t0 = Instant::now();
        let usage = Usage {
            bytes: 4096,
            inodes: 3,
        };
        assert_eq!(cache.fresh("c", t0), None);
        cache.store("c", t0, usage);
        assert_eq!(cache.fresh("c", t0 + Duration::from_secs(9)), Some(usage));
        assert_eq!(cache.fresh("c", t0 + LAYER_USAGE_TTL), None);
        cache.forget("c");
        assert_eq!(cache.fresh("c", t0), None);
    }

    #[test]
    fn the_cpu_rate_needs_two_samples() {
        let rates = CpuRates::default();
        assert_eq!(rates.rate("c", 1_000_000_000, 0), None);
        // Half a core over one second.
        assert_eq!(
            rates.rate("c", 2_000_000_000, 500_000_000),
            Some(500_000_000)
        );
        // A counter that went backwards (a new task) gives no rate.
        assert_eq!(rates.rate("c", 3_000_000_000, 1), None);
    }

    #[test]
    fn net_dev_gives_each_interface_but_lo() {
        let text = "\
Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:     560       8    0    0    0     0          0         0      560       8    0    0    0     0       0          0
  eth0:    1502      17    3    0    0     0          0         0      906       9    4    0    0     0       0          0
 net1: 7 1 0 0 0 0 0 0 8 1 0 0 0 0 0 0
 bad: 1 2 x
";
        let interfaces = parse_net_dev(text);
        assert_eq!(
            interfaces,
            [
                InterfaceCounters {
                    name: "eth0".into(),
                    rx_bytes: 1502,
                    rx_errors: 3,
                    tx_bytes: 906,
                    tx_errors: 4,
                },
                InterfaceCounters {
                    name: "net1".into(),
                    rx_bytes: 7,
                    rx_errors: 0,
                    tx_bytes: 8,
                    tx_errors: 0,
                },
            ]
        );
        assert!(parse_net_dev("").is_empty());
    }

    #[test]
    fn a_pods_namespace_is_read_not_the_daemons() {
        let dir = tempfile::tempdir().unwrap();
        let ns = NetNs::create(dir.path(), "stats").unwrap();
        let read = read_interfaces(ns.path().to_path_buf());
        ns.remove().unwrap();
        // A fresh namespace has only `lo`, which is left out; the daemon's
        // own namespace would show its interfaces.
        assert_eq!(read.unwrap(), []);
        assert!(read_interfaces(dir.path().join("missing")).is_err());
    }
}
