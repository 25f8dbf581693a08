//! A runtime v2 shim that runs no container: it answers `Connect`, `Create`
//! (publishing `/tasks/create`) and `Shutdown`, logs to containerd's `log`
//! FIFO and answers `delete` with exit status 137. The fixtures' tests start
//! it to prove `ShimProcess` against the containerd-shim crate's real
//! bootstrap, which corral's shim shares, without depending on corral's shim.

use std::sync::Arc;

use containerd_shim::api::{
    ConnectRequest, ConnectResponse, CreateTaskRequest, CreateTaskResponse, DeleteResponse, Empty,
    ShutdownRequest,
};
use containerd_shim::protos::events::task::TaskCreate;
use containerd_shim::protos::topics::TASK_CREATE_EVENT_TOPIC;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{
    spawn, Config, Context, ExitSignal, Flags, Shim, StartOpts, Task, TtrpcContext, TtrpcResult,
};

struct FakeShim {
    namespace: String,
    exit: Arc<ExitSignal>,
}

impl Shim for FakeShim {
    type T = FakeTask;

    fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        FakeShim {
            namespace: args.namespace.clone(),
            exit: Arc::new(ExitSignal::default()),
        }
    }

    fn start_shim(&mut self, opts: StartOpts) -> containerd_shim::Result<String> {
        let grouping = opts.id.clone();
        let (_pid, address) = spawn(opts, &grouping, Vec::new())?;
        containerd_shim::util::write_address(&address)?;
        Ok(address)
    }

    fn delete_shim(&mut self) -> containerd_shim::Result<DeleteResponse> {
        Ok(DeleteResponse {
            exit_status: 137,
            ..Default::default()
        })
    }

    fn wait(&mut self) {
        self.exit.wait();
    }

    fn create_task_service(&self, publisher: RemotePublisher) -> FakeTask {
        log::info!("fake shim serving namespace {}", self.namespace);
        FakeTask {
            namespace: self.namespace.clone(),
            exit: self.exit.clone(),
            publisher,
        }
    }
}

struct FakeTask {
    namespace: String,
    exit: Arc<ExitSignal>,
    publisher: RemotePublisher,
}

impl Task for FakeTask {
    fn connect(&self, _ctx: &TtrpcContext, _req: ConnectRequest) -> TtrpcResult<ConnectResponse> {
        Ok(ConnectResponse {
            shim_pid: std::process::id(),
            version: "fake".into(),
            ..Default::default()
        })
    }

    fn create(
        &self,
        _ctx: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> TtrpcResult<CreateTaskResponse> {
        let event = TaskCreate {
            container_id: req.id.clone(),
            bundle: req.bundle.clone(),
            ..Default::default()
        };
        self.publisher
            .publish(
                Context::default(),
                TASK_CREATE_EVENT_TOPIC,
                &self.namespace,
                Box::new(event),
            )
            .map_err(|e| containerd_shim::protos::ttrpc::Error::Others(e.to_string()))?;
        Ok(CreateTaskResponse::default())
    }

    fn shutdown(&self, _ctx: &TtrpcContext, _req: ShutdownRequest) -> TtrpcResult<Empty> {
        self.exit.signal();
        Ok(Empty::default())
    }
}

fn main() {
    containerd_shim::run::<FakeShim>("io.containerd.corral-e2e-fake.v1", None);
}
