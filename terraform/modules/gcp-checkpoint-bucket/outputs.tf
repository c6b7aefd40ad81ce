output "bucket_name" {
  description = "Name of the checkpoint bucket."
  value       = google_storage_bucket.this.name
}

output "bucket_url" {
  description = "gs:// URL of the bucket."
  value       = google_storage_bucket.this.url
}

output "checkpoint_url" {
  description = "URL to hand to cloudckpt (e.g. CheckpointManager(directory=...) or a run directory below it): gs://<bucket>/<key_prefix>."
  value       = "gs://${google_storage_bucket.this.name}/${var.key_prefix}"
}

output "service_account_email" {
  description = "Email of the created training service account (null unless create_service_account)."
  value       = one(google_service_account.trainer[*].email)
}

output "service_account_name" {
  description = "Full resource name of the created service account, for Workload Identity bindings (null unless create_service_account)."
  value       = one(google_service_account.trainer[*].name)
}
