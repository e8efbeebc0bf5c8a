//! `/api/v1/vms`.

use std::collections::HashSet;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;

use super::error::ApiError;
use super::json::AppJson;
use super::AppState;
use crate::error::DaemonError;
use crate::model::{DiskSpec, Vm, VmRequest};
use crate::names;

/// Largest disk size accepted (matches the qcow2 backend's limit).
const MAX_DISK_BYTES: u64 = qcow_backend::header::MAX_VIRTUAL_SIZE;
/// Most disks per VM.
const MAX_DISKS: usize = 256;

fn check_name(name: &str) -> Result<(), ApiError> {
    names::validate("vm_name", name).map_err(ApiError::bad_request)
}

fn validate_disks(disks: &mut [DiskSpec]) -> Result<(), ApiError> {
    if disks.len() > MAX_DISKS {
        return Err(ApiError::bad_request(format!(
            "more than {MAX_DISKS} disks"
        )));
    }
    let (mut ids, mut keys) = (HashSet::new(), HashSet::new());
    for d in disks.iter_mut() {
        if d.size_bytes == 0 || d.size_bytes > MAX_DISK_BYTES || d.size_bytes % 512 != 0 {
            return Err(ApiError::bad_request(format!(
                "disk {}: size_bytes must be a positive multiple of 512 up to {MAX_DISK_BYTES}",
                d.disk_id
            )));
        }
        if d.label.len() > 256 {
            return Err(ApiError::bad_request(format!(
                "disk {}: label too long",
                d.disk_id
            )));
        }
        let key = d.disk_key.unwrap_or(2000 + d.unit_number);
        d.disk_key = Some(key);
        if !ids.insert(d.disk_id) {
            return Err(ApiError::bad_request(format!(
                "disk_id {} given twice",
                d.disk_id
            )));
        }
        if !keys.insert(key) {
            return Err(ApiError::bad_request(format!("disk_key {key} given twice")));
        }
    }
    disks.sort_by_key(|d| d.disk_id);
    Ok(())
}

/// `PUT /api/v1/vms/{vm_name}`: register or replace a VM's disks.
pub async fn put(
    State(st): State<AppState>,
    Path(name): Path<String>,
    AppJson(mut req): AppJson<VmRequest>,
) -> Result<Json<Vm>, ApiError> {
    check_name(&name)?;
    if req.vm_context_id.len() > 256 {
        return Err(ApiError::bad_request("vm_context_id too long"));
    }
    validate_disks(&mut req.disks)?;
    Ok(Json(
        st.catalog()
            .put_vm(&name, &req.vm_context_id, req.disks)
            .await?,
    ))
}

/// `GET /api/v1/vms`.
pub async fn list(State(st): State<AppState>) -> Result<Json<Vec<Vm>>, ApiError> {
    Ok(Json(st.catalog().vms().await?))
}

/// `GET /api/v1/vms/{vm_name}`.
pub async fn get(
    State(st): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Vm>, ApiError> {
    check_name(&name)?;
    let vm = st.catalog().vm(&name).await?;
    vm.map(Json).ok_or(ApiError(DaemonError::NotFound {
        what: "VM",
        id: name,
    }))
}

/// `DELETE /api/v1/vms/{vm_name}`.
pub async fn delete(
    State(st): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    check_name(&name)?;
    if st.catalog().delete_vm(&name).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError(DaemonError::NotFound {
            what: "VM",
            id: name,
        }))
    }
}
