# A GCS bucket set up for cloudckpt checkpoints: uniform bucket-level access, public
# access prevention enforced, versioning and soft delete as chosen, lifecycle rules for
# what an interrupted save leaves behind, optional CMEK, and a service account with
# object read/write. See terraform/README.md for how each setting maps onto cloudckpt.

locals {
  service_account_id = coalesce(var.service_account_id, "cloudckpt-trainer")

  # Keys known at plan time (for_each needs that); values may be computed.
  object_users = merge(
    var.create_service_account ? { "created-service-account" = "serviceAccount:${google_service_account.trainer[0].email}" } : {},
    { for member in var.object_user_members : member => member },
  )
}

# CMEK: GCS encrypts with the key on the caller's behalf, so it is the project's Cloud
# Storage service agent - not the training job - that needs to use the key.
data "google_storage_project_service_account" "gcs" {
  count   = var.kms_key_name == null ? 0 : 1
  project = var.project_id
}

resource "google_kms_crypto_key_iam_member" "gcs_uses_key" {
  count         = var.kms_key_name == null ? 0 : 1
  crypto_key_id = var.kms_key_name
  role          = "roles/cloudkms.cryptoKeyEncrypterDecrypter"
  member        = "serviceAccount:${data.google_storage_project_service_account.gcs[0].email_address}"
}

resource "google_storage_bucket" "this" {
  #checkov:skip=CKV_GCP_62:Usage and storage logs need a separate log bucket owned by the organisation's logging project; object-level audit belongs in Cloud Audit Logs (Data Access logs for Cloud Storage), enabled at the project or organisation level, not per bucket here.
  name          = var.bucket_name
  project       = var.project_id
  location      = var.location
  storage_class = var.storage_class
  force_destroy = var.force_destroy
  labels        = var.labels

  # IAM alone decides access: no object ACLs that could make one object public or
  # readable by someone the bucket's IAM policy does not name.
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"

  versioning {
    enabled = var.versioning_enabled
  }

  soft_delete_policy {
    retention_duration_seconds = var.soft_delete_retention_days * 86400
  }

  dynamic "encryption" {
    for_each = var.kms_key_name == null ? [] : [var.kms_key_name]

    content {
      default_kms_key_name = encryption.value
    }
  }

  # A save killed mid-upload (preemption, SIGKILL, OOM) can leave an XML-API multipart
  # upload that no object listing shows and that bills for its parts until aborted.
  lifecycle_rule {
    condition {
      age = var.abort_incomplete_multipart_upload_days
    }
    action {
      type = "AbortIncompleteMultipartUpload"
    }
  }

  # Bounds what versioning costs: checkpoints that cloudckpt's retention deleted (or that a
  # re-save replaced) are kept as noncurrent versions for this long, then removed.
  lifecycle_rule {
    condition {
      days_since_noncurrent_time = var.noncurrent_version_expiration_days
      with_state                 = "ARCHIVED"
    }
    action {
      type = "Delete"
    }
  }

  # cloudckpt's temporary objects (parallel-composite chunks, write probes) live under
  # <storage root>/.cloudckpt-tmp/ and end in ".cloudckpt-tmp". GCS prefixes match from the
  # bucket root, so the suffix is what finds them under every storage root.
  lifecycle_rule {
    condition {
      age            = var.temp_object_expiration_days
      matches_suffix = [".cloudckpt-tmp"]
      with_state     = "ANY"
    }
    action {
      type = "Delete"
    }
  }

  depends_on = [google_kms_crypto_key_iam_member.gcs_uses_key]
}

resource "google_service_account" "trainer" {
  count        = var.create_service_account ? 1 : 0
  project      = var.project_id
  account_id   = local.service_account_id
  display_name = "cloudckpt training job (gs://${var.bucket_name})"
}

# roles/storage.objectUser: get, list, create, overwrite, delete objects, and create,
# list and abort multipart uploads - what cloudckpt's saves, restores, compose and
# retention do. Not objectAdmin (no object IAM), no bucket-level permissions.
resource "google_storage_bucket_iam_member" "object_user" {
  for_each = local.object_users

  bucket = google_storage_bucket.this.name
  role   = "roles/storage.objectUser"
  member = each.value
}
