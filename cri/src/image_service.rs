//! CRI v1 `ImageService`: pulling, listing, inspecting and removing images.
//!
//! This module owns the translation of ImageService requests into the
//! runtime layer's image store. The store does not exist yet, so every RPC
//! answers `Unimplemented`, naming itself; the service is registered anyway
//! so that kubelet and crictl get that clear answer rather than a missing
//! gRPC service.

use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_server::ImageService;
use tonic::Request;

use crate::error::{not_yet, RpcResult};

/// The ImageService of one daemon.
#[derive(Debug, Default)]
pub struct CriImageService {}

impl CriImageService {
    pub fn new() -> Self {
        CriImageService {}
    }
}

#[tonic::async_trait]
impl ImageService for CriImageService {
    async fn list_images(
        &self,
        _request: Request<cri::ListImagesRequest>,
    ) -> RpcResult<cri::ListImagesResponse> {
        not_yet("ListImages")
    }

    async fn image_status(
        &self,
        _request: Request<cri::ImageStatusRequest>,
    ) -> RpcResult<cri::ImageStatusResponse> {
        not_yet("ImageStatus")
    }

    async fn pull_image(
        &self,
        _request: Request<cri::PullImageRequest>,
    ) -> RpcResult<cri::PullImageResponse> {
        not_yet("PullImage")
    }

    async fn remove_image(
        &self,
        _request: Request<cri::RemoveImageRequest>,
    ) -> RpcResult<cri::RemoveImageResponse> {
        not_yet("RemoveImage")
    }

    async fn image_fs_info(
        &self,
        _request: Request<cri::ImageFsInfoRequest>,
    ) -> RpcResult<cri::ImageFsInfoResponse> {
        not_yet("ImageFsInfo")
    }
}
