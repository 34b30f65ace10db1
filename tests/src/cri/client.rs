//! A CRI client, the kubelet's side of the API: the CRI v1 services' generated clients
//! (`k8s-cri`) over tonic on a Unix socket, behind a blocking API so that tests read as plain
//! sequences of calls. The client owns a single-threaded tokio runtime and blocks on it for
//! each call, under a deadline.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use k8s_cri::v1 as api;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::{Channel, Endpoint, Uri};

/// What a CRI call can end in, besides its answer.
#[derive(Debug, thiserror::Error)]
pub enum CriError {
    /// The tokio runtime could not be made.
    #[error("cannot start the CRI client's runtime")]
    Runtime(#[source] std::io::Error),
    /// The socket did not take the connection.
    #[error("cannot connect to the CRI socket {path}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: tonic::transport::Error,
    },
    /// The runtime answered with an error.
    #[error("{call}: {code:?}: {message}", code = .status.code(), message = .status.message())]
    Status {
        /// The RPC.
        call: &'static str,
        /// The runtime's answer.
        #[source]
        status: tonic::Status,
    },
    /// No answer came within the deadline.
    #[error("{call}: no answer within {deadline:?}")]
    Timeout {
        /// The RPC.
        call: &'static str,
        /// How long the client waited.
        deadline: Duration,
    },
}

impl CriError {
    /// The gRPC status code, if the runtime answered with an error.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            Self::Status { status, .. } => Some(status.code()),
            _ => None,
        }
    }

    /// Whether the runtime answered that what was asked for does not exist.
    pub fn is_not_found(&self) -> bool {
        self.code() == Some(tonic::Code::NotFound)
    }
}

/// A connection to a CRI runtime's socket: the runtime and image services.
pub struct Cri {
    runtime: tokio::runtime::Runtime,
    runtime_service: RuntimeServiceClient<Channel>,
    image_service: ImageServiceClient<Channel>,
    deadline: Duration,
}

impl Cri {
    /// Connects to the CRI socket at `socket`; each call then waits at most `deadline` (the
    /// calls that start a micro-VM need a minute on a PVM host).
    pub fn connect(socket: &Path, deadline: Duration) -> Result<Self, CriError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(CriError::Runtime)?;
        let path = socket.to_owned();
        let channel = runtime
            .block_on(async {
                // The URI is a placeholder: the connector below dials the socket.
                Endpoint::from_static("http://[::]:50051")
                    .connect_with_connector(tower::service_fn(move |_: Uri| {
                        let path = path.clone();
                        async move {
                            let stream = tokio::net::UnixStream::connect(path).await?;
                            Ok::<_, std::io::Error>(TokioIo::new(stream))
                        }
                    }))
                    .await
            })
            .map_err(|source| CriError::Connect {
                path: socket.to_owned(),
                source,
            })?;
        Ok(Self {
            runtime,
            runtime_service: RuntimeServiceClient::new(channel.clone()),
            image_service: ImageServiceClient::new(channel),
            deadline,
        })
    }

    /// Runs one call to its answer, or until `deadline`.
    fn call<T, F>(&self, call: &'static str, deadline: Duration, rpc: F) -> Result<T, CriError>
    where
        F: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.runtime
            .block_on(async { tokio::time::timeout(deadline, rpc).await })
            .map_err(|_| CriError::Timeout { call, deadline })?
            .map(tonic::Response::into_inner)
            .map_err(|status| CriError::Status { call, status })
    }

    fn rt(&self) -> RuntimeServiceClient<Channel> {
        self.runtime_service.clone()
    }

    /// `Version`: the runtime's name, version and CRI version.
    pub fn version(&self) -> Result<api::VersionResponse, CriError> {
        let request = api::VersionRequest {
            version: "v1".into(),
        };
        self.call("Version", self.deadline, self.rt().version(request))
    }

    /// `Status`: the runtime's conditions (`RuntimeReady`, `NetworkReady`).
    pub fn status(&self) -> Result<api::RuntimeStatus, CriError> {
        let request = api::StatusRequest { verbose: false };
        let status = self.call("Status", self.deadline, self.rt().status(request))?;
        Ok(status.status.unwrap_or_default())
    }

    /// `Status` with `verbose`: the runtime's `info` (containerd: its CRI config as JSON under
    /// `config`, with each runtime handler's `PodAnnotations`).
    pub fn status_info(&self) -> Result<HashMap<String, String>, CriError> {
        let request = api::StatusRequest { verbose: true };
        let status = self.call("Status", self.deadline, self.rt().status(request))?;
        Ok(status.info)
    }

    /// `RunPodSandbox` with the runtime handler `handler`: the sandbox's id.
    pub fn run_pod_sandbox(
        &self,
        config: &api::PodSandboxConfig,
        handler: &str,
    ) -> Result<String, CriError> {
        let request = api::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: handler.into(),
        };
        let answer = self.call(
            "RunPodSandbox",
            self.deadline,
            self.rt().run_pod_sandbox(request),
        )?;
        Ok(answer.pod_sandbox_id)
    }

    /// `PodSandboxStatus`; `verbose` adds the runtime's `info` (containerd: JSON under
    /// `info`, with the sandbox's OCI spec).
    pub fn pod_sandbox_status(
        &self,
        id: &str,
        verbose: bool,
    ) -> Result<api::PodSandboxStatusResponse, CriError> {
        let request = api::PodSandboxStatusRequest {
            pod_sandbox_id: id.into(),
            verbose,
        };
        self.call(
            "PodSandboxStatus",
            self.deadline,
            self.rt().pod_sandbox_status(request),
        )
    }

    /// `ListPodSandbox`, all of them or those `filter` selects.
    pub fn list_pod_sandbox(
        &self,
        filter: Option<api::PodSandboxFilter>,
    ) -> Result<Vec<api::PodSandbox>, CriError> {
        let request = api::ListPodSandboxRequest { filter };
        let answer = self.call(
            "ListPodSandbox",
            self.deadline,
            self.rt().list_pod_sandbox(request),
        )?;
        Ok(answer.items)
    }

    /// `StopPodSandbox`: stops its containers and the sandbox, tears down its network.
    pub fn stop_pod_sandbox(&self, id: &str) -> Result<(), CriError> {
        let request = api::StopPodSandboxRequest {
            pod_sandbox_id: id.into(),
        };
        self.call(
            "StopPodSandbox",
            self.deadline,
            self.rt().stop_pod_sandbox(request),
        )
        .map(drop)
    }

    /// `RemovePodSandbox`.
    pub fn remove_pod_sandbox(&self, id: &str) -> Result<(), CriError> {
        let request = api::RemovePodSandboxRequest {
            pod_sandbox_id: id.into(),
        };
        self.call(
            "RemovePodSandbox",
            self.deadline,
            self.rt().remove_pod_sandbox(request),
        )
        .map(drop)
    }

    /// `PullImage` of `image` for the pod `sandbox`: the image's reference (its id).
    pub fn pull_image(
        &self,
        image: &str,
        sandbox: Option<&api::PodSandboxConfig>,
    ) -> Result<String, CriError> {
        let request = api::PullImageRequest {
            image: Some(image_spec(image)),
            auth: None,
            sandbox_config: sandbox.cloned(),
        };
        let answer = self.call(
            "PullImage",
            self.deadline,
            self.image_service.clone().pull_image(request),
        )?;
        Ok(answer.image_ref)
    }

    /// `ImageStatus`: the image, if the runtime has it.
    pub fn image_status(&self, image: &str) -> Result<Option<api::Image>, CriError> {
        let request = api::ImageStatusRequest {
            image: Some(image_spec(image)),
            verbose: false,
        };
        let answer = self.call(
            "ImageStatus",
            self.deadline,
            self.image_service.clone().image_status(request),
        )?;
        Ok(answer.image)
    }

    /// `RemoveImage`.
    pub fn remove_image(&self, image: &str) -> Result<(), CriError> {
        let request = api::RemoveImageRequest {
            image: Some(image_spec(image)),
        };
        self.call(
            "RemoveImage",
            self.deadline,
            self.image_service.clone().remove_image(request),
        )
        .map(drop)
    }

    /// `CreateContainer` in the pod `sandbox_id` (made from `sandbox`): the container's id.
    pub fn create_container(
        &self,
        sandbox_id: &str,
        config: &api::ContainerConfig,
        sandbox: &api::PodSandboxConfig,
    ) -> Result<String, CriError> {
        let request = api::CreateContainerRequest {
            pod_sandbox_id: sandbox_id.into(),
            config: Some(config.clone()),
            sandbox_config: Some(sandbox.clone()),
        };
        let answer = self.call(
            "CreateContainer",
            self.deadline,
            self.rt().create_container(request),
        )?;
        Ok(answer.container_id)
    }

    /// `StartContainer`.
    pub fn start_container(&self, id: &str) -> Result<(), CriError> {
        let request = api::StartContainerRequest {
            container_id: id.into(),
        };
        self.call(
            "StartContainer",
            self.deadline,
            self.rt().start_container(request),
        )
        .map(drop)
    }

    /// `ContainerStatus`.
    pub fn container_status(&self, id: &str) -> Result<api::ContainerStatus, CriError> {
        let request = api::ContainerStatusRequest {
            container_id: id.into(),
            verbose: false,
        };
        let answer = self.call(
            "ContainerStatus",
            self.deadline,
            self.rt().container_status(request),
        )?;
        Ok(answer.status.unwrap_or_default())
    }

    /// `ContainerStats`.
    pub fn container_stats(&self, id: &str) -> Result<api::ContainerStats, CriError> {
        let request = api::ContainerStatsRequest {
            container_id: id.into(),
        };
        let answer = self.call(
            "ContainerStats",
            self.deadline,
            self.rt().container_stats(request),
        )?;
        Ok(answer.stats.unwrap_or_default())
    }

    /// `ExecSync` of `cmd` in container `id`, which the runtime ends after `timeout` (whole
    /// seconds; the client waits a little longer for the answer).
    pub fn exec_sync(
        &self,
        id: &str,
        cmd: &[&str],
        timeout: Duration,
    ) -> Result<api::ExecSyncResponse, CriError> {
        let request = api::ExecSyncRequest {
            container_id: id.into(),
            cmd: cmd.iter().map(|c| (*c).to_owned()).collect(),
            timeout: timeout.as_secs() as i64,
        };
        self.call(
            "ExecSync",
            timeout + Duration::from_secs(30),
            self.rt().exec_sync(request),
        )
    }

    /// `StopContainer`: the stop signal, then SIGKILL after `grace` (whole seconds).
    pub fn stop_container(&self, id: &str, grace: Duration) -> Result<(), CriError> {
        let request = api::StopContainerRequest {
            container_id: id.into(),
            timeout: grace.as_secs() as i64,
        };
        self.call(
            "StopContainer",
            self.deadline + grace,
            self.rt().stop_container(request),
        )
        .map(drop)
    }

    /// `RemoveContainer`.
    pub fn remove_container(&self, id: &str) -> Result<(), CriError> {
        let request = api::RemoveContainerRequest {
            container_id: id.into(),
        };
        self.call(
            "RemoveContainer",
            self.deadline,
            self.rt().remove_container(request),
        )
        .map(drop)
    }

    /// `ListContainers`, all of them or those `filter` selects.
    pub fn list_containers(
        &self,
        filter: Option<api::ContainerFilter>,
    ) -> Result<Vec<api::Container>, CriError> {
        let request = api::ListContainersRequest { filter };
        let answer = self.call(
            "ListContainers",
            self.deadline,
            self.rt().list_containers(request),
        )?;
        Ok(answer.containers)
    }
}

/// An image by reference, as the kubelet names it.
pub fn image_spec(image: &str) -> api::ImageSpec {
    api::ImageSpec {
        image: image.into(),
        ..Default::default()
    }
}
