# A checkpoint bucket and the service account a training job runs as, on GCE (attach the
# service account to the VM) or on GKE (Workload Identity). The job then only needs the URL:
#
#   terraform apply -var project_id=acme-ml -var bucket_name=acme-llm-checkpoints
#   export CKPT_DIR=$(terraform output -raw checkpoint_url)/run-42
#   python train.py   # cloudckpt.CheckpointManager(ckpt, directory=os.environ["CKPT_DIR"], ...)
#
# Credentials come from the VM's / pod's service account through google-auth's default
# chain; nothing to configure in cloudckpt.

terraform {
  required_version = ">= 1.5"

  required_providers {
    google = {
      source  = "hashicorp/google"
      version = ">= 5.30, < 7.0"
    }
  }
}

provider "google" {
  project = var.project_id
  region  = var.region
}

variable "project_id" {
  description = "Project of the training job and the bucket."
  type        = string
}

variable "region" {
  description = "Region of the training VMs / GKE cluster; the bucket goes there too (no egress, lowest latency)."
  type        = string
  default     = "us-central1"
}

variable "bucket_name" {
  description = "Globally unique bucket name."
  type        = string
}

variable "gke_service_account" {
  description = "Kubernetes service account (\"namespace/name\") that may act as the training service account through Workload Identity. null = GCE VMs only."
  type        = string
  default     = null
}

module "checkpoints" {
  source = "../../modules/gcp-checkpoint-bucket"

  project_id  = var.project_id
  bucket_name = var.bucket_name
  location    = var.region
  key_prefix  = "checkpoints"

  versioning_enabled                     = true
  noncurrent_version_expiration_days     = 7
  soft_delete_retention_days             = 0
  abort_incomplete_multipart_upload_days = 1
  temp_object_expiration_days            = 1

  create_service_account = true
  service_account_id     = "llm-trainer"

  labels = {
    project = "llm-pretraining"
  }
}

# GKE Workload Identity: the pod's Kubernetes service account acts as the Google one.
resource "google_service_account_iam_member" "workload_identity" {
  count = var.gke_service_account == null ? 0 : 1

  service_account_id = module.checkpoints.service_account_name
  role               = "roles/iam.workloadIdentityUser"
  member             = "serviceAccount:${var.project_id}.svc.id.goog[${var.gke_service_account}]"
}

output "checkpoint_url" {
  description = "Give this (or a run directory below it) to cloudckpt."
  value       = module.checkpoints.checkpoint_url
}

output "service_account_email" {
  description = "Run training VMs as this service account; for GKE, annotate the Kubernetes service account with iam.gke.io/gcp-service-account = this."
  value       = module.checkpoints.service_account_email
}
