//! `/api/v1/vms`.

use std::collections::HashSet;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;

use super::doc::{BodyErrors, E400, E404, E409, E507};
use super::error::ApiError;
use super::json::{AppJson, AppPath};
use super::AppState;
use crate::model::{DiskSpec, Vm, VmRequest};
use crate::names;

/// Largest disk size accepted: the largest image a backup can create. With
/// the daemon's cluster size (64 KiB) each L1 entry maps one L2 table's
/// worth, cluster × cluster/8 bytes (512 MiB), and the L1 table holds at
/// most `MAX_L1_BYTES / 8` entries (32 MiB / 8 = 4 Mi): 2 PiB (2^51), well
/// under the backend's own cap. Checked against `QcowBackend::create` in
/// the tests.
pub const MAX_DISK_BYTES: u64 = {
    let cluster = qcow_backend::DEFAULT_CLUSTER_SIZE as u64;
    let per_l1_entry = cluster * (cluster / 8);
    let by_l1 = (qcow_backend::header::MAX_L1_BYTES / 8) * per_l1_entry;
    if by_l1 < qcow_backend::header::MAX_VIRTUAL_SIZE {
        by_l1
    } else {
        qcow_backend::header::MAX_VIRTUAL_SIZE
    }
};
/// VMware numbers disk devices from this key up, by unit number.
const FIRST_DISK_KEY: u32 = 2000;
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
        let key = match d.disk_key {
            Some(k) => k,
            None => FIRST_DISK_KEY.checked_add(d.unit_number).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "disk {}: unit_number {} is too large to derive disk_key ({FIRST_DISK_KEY} + unit_number); give disk_key",
                    d.disk_id, d.unit_number
                ))
            })?,
        };
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
#[utoipa::path(
    put,
    path = "/api/v1/vms/{vm_name}",
    tag = "vms",
    params(("vm_name" = String, Path, pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$", description = "VM name")),
    request_body = VmRequest,
    responses(
        (status = 200, description = "Registered; disks by disk_id with disk_key resolved.", body = Vm),
        BodyErrors,
        E409,
        E507,
    )
)]
pub async fn put(
    State(st): State<AppState>,
    AppPath(name): AppPath<String>,
    AppJson(mut req): AppJson<VmRequest>,
) -> Result<Json<Vm>, ApiError> {
    check_name(&name)?;
    if req.vm_context_id.len() > 256 {
        return Err(ApiError::bad_request("vm_context_id too long"));
    }
    validate_disks(&mut req.disks)?;
    let sna_url = req
        .sna_url
        .as_deref()
        .map(|u| crate::sna::check_url("sna_url", u))
        .transpose()
        .map_err(ApiError::bad_request)?;
    Ok(Json(
        st.catalog()
            .put_vm(&name, &req.vm_context_id, req.disks, sna_url)
            .await?,
    ))
}

/// `GET /api/v1/vms`.
#[utoipa::path(
    get,
    path = "/api/v1/vms",
    tag = "vms",
    responses((status = 200, description = "Every registered VM.", body = Vec<Vm>))
)]
pub async fn list(State(st): State<AppState>) -> Result<Json<Vec<Vm>>, ApiError> {
    Ok(Json(st.catalog().vms().await?))
}

/// `GET /api/v1/vms/{vm_name}`.
#[utoipa::path(
    get,
    path = "/api/v1/vms/{vm_name}",
    tag = "vms",
    params(("vm_name" = String, Path, pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$", description = "VM name")),
    responses((status = 200, description = "The VM.", body = Vm), E400, E404)
)]
pub async fn get(
    State(st): State<AppState>,
    AppPath(name): AppPath<String>,
) -> Result<Json<Vm>, ApiError> {
    check_name(&name)?;
    let vm = st.catalog().vm(&name).await?;
    vm.map(Json).ok_or_else(|| ApiError::not_found("VM", name))
}

/// `DELETE /api/v1/vms/{vm_name}`: forget a VM (its backups stay).
#[utoipa::path(
    delete,
    path = "/api/v1/vms/{vm_name}",
    tag = "vms",
    params(("vm_name" = String, Path, pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$", description = "VM name")),
    responses((status = 204, description = "Forgotten."), E400, E404, E409, E507)
)]
pub async fn delete(
    State(st): State<AppState>,
    AppPath(name): AppPath<String>,
) -> Result<StatusCode, ApiError> {
    check_name(&name)?;
    if st.catalog().delete_vm(&name).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found("VM", name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(size_bytes: u64, unit_number: u32, disk_key: Option<u32>) -> DiskSpec {
        DiskSpec {
            disk_id: 0,
            size_bytes,
            unit_number,
            disk_key,
            label: String::new(),
        }
    }

    #[test]
    fn max_disk_size_is_what_the_l1_table_can_map() {
        assert_eq!(MAX_DISK_BYTES, 1 << 51);
        assert!(validate_disks(&mut [disk(MAX_DISK_BYTES, 0, None)]).is_ok());
        for bad in [0, 511, MAX_DISK_BYTES + 512, 1 << 52, 1 << 56, u64::MAX] {
            assert!(validate_disks(&mut [disk(bad, 0, None)]).is_err(), "{bad}");
        }
    }

    #[test]
    fn disk_key_never_wraps() {
        let mut d = [disk(512, 7, None)];
        validate_disks(&mut d).unwrap();
        assert_eq!(d[0].disk_key, Some(2007));
        let mut d = [disk(512, u32::MAX - 2000, None)];
        validate_disks(&mut d).unwrap();
        assert_eq!(d[0].disk_key, Some(u32::MAX));
        assert!(validate_disks(&mut [disk(512, u32::MAX - 1999, None)]).is_err());
        assert!(validate_disks(&mut [disk(512, u32::MAX, None)]).is_err());
        // An explicit key needs no arithmetic.
        assert!(validate_disks(&mut [disk(512, u32::MAX, Some(5))]).is_ok());
    }

    /// The limit is real: a backup can create an image of exactly that size
    /// (and the backend's own refusal starts right above it).
    #[tokio::test]
    async fn an_image_of_the_largest_size_can_be_created() {
        use qcow_backend::{CreateOptions, OpenOptions, QcowBackend};
        let dir = tempfile::tempdir().unwrap();
        let create = |size| CreateOptions {
            size: Some(size),
            cluster_size: qcow_backend::DEFAULT_CLUSTER_SIZE,
            backing: None,
            backing_format: None,
        };
        let path = dir.path().join("max.qcow2");
        let img = QcowBackend::create(&path, &create(MAX_DISK_BYTES), &OpenOptions::new())
            .await
            .unwrap();
        assert_eq!(nbd_server::BlockBackend::size(&img), MAX_DISK_BYTES);
        drop(img);
        let over = dir.path().join("over.qcow2");
        let r =
            QcowBackend::create(&over, &create(MAX_DISK_BYTES + 512), &OpenOptions::new()).await;
        let Err(e) = r else {
            panic!("the backend accepted max + 512");
        };
        assert!(e.to_string().contains("L1 table"), "{e}");
    }
}
