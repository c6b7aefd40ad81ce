variable "project_id" {
  description = "Google Cloud project that owns the bucket (and the service account, if created)."
  type        = string

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{4,28}[a-z0-9]$", var.project_id))
    error_message = "project_id must be a project ID (6-30 characters: lowercase letters, digits, hyphens; starting with a letter), not a project number or name."
  }
}

variable "bucket_name" {
  description = "Name of the GCS bucket to create. Globally unique, 3-63 characters of lowercase letters, digits, hyphens and underscores (no dots: see the validation message)."
  type        = string

  validation {
    condition     = length(var.bucket_name) >= 3 && length(var.bucket_name) <= 63
    error_message = "bucket_name must be 3 to 63 characters long (GCS bucket naming rules)."
  }

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9_-]*[a-z0-9]$", var.bucket_name))
    error_message = "bucket_name may contain only lowercase letters, digits, hyphens and underscores, and must begin and end with a letter or digit. Dotted names are refused on purpose: GCS requires domain verification for them."
  }

  validation {
    condition     = !startswith(var.bucket_name, "goog") && length(regexall("g[o0][o0]g[l1]e", var.bucket_name)) == 0
    error_message = "bucket_name may not start with \"goog\" or contain \"google\" (or close misspellings): GCS reserves them."
  }
}

variable "location" {
  description = "Bucket location: a region (e.g. \"us-central1\", the same as the training VMs to avoid egress charges and latency) or a multi-/dual-region."
  type        = string
}

variable "storage_class" {
  description = "Default storage class. STANDARD: checkpoints are written and read often and deleted within days, so the colder classes' minimum storage durations and retrieval fees cost more than they save."
  type        = string
  default     = "STANDARD"

  validation {
    condition     = contains(["STANDARD", "NEARLINE", "COLDLINE", "ARCHIVE"], var.storage_class)
    error_message = "storage_class must be STANDARD, NEARLINE, COLDLINE or ARCHIVE."
  }
}

variable "key_prefix" {
  description = "Object name prefix (no leading or trailing slash) for checkpoints; the checkpoint_url output is gs://<bucket>/<key_prefix>. Unlike the AWS module, access is granted on the whole bucket (see README) - keep one bucket per workload."
  type        = string
  default     = "checkpoints"

  validation {
    condition     = length(var.key_prefix) <= 512 && can(regex("^[A-Za-z0-9_-][A-Za-z0-9._-]*(/[A-Za-z0-9_-][A-Za-z0-9._-]*)*$", var.key_prefix))
    error_message = "key_prefix must be one or more '/'-separated segments of letters, digits, '.', '_' or '-' (a segment may not start with '.'), without leading or trailing '/', at most 512 characters."
  }
}

variable "versioning_enabled" {
  description = "Keep noncurrent versions of overwritten or deleted objects. Protects checkpoints against an accidental delete or a buggy overwrite, but with versioning on, a checkpoint that cloudckpt's retention deletes (max_to_keep) keeps being billed as a noncurrent version until noncurrent_version_expiration_days pass."
  type        = bool
  default     = true
}

variable "noncurrent_version_expiration_days" {
  description = "Days after an object becomes noncurrent (overwritten, or deleted by cloudckpt's retention) before GCS deletes that version. This is how long deleted checkpoints stay recoverable - and billed."
  type        = number
  default     = 7

  validation {
    condition     = var.noncurrent_version_expiration_days >= 1 && floor(var.noncurrent_version_expiration_days) == var.noncurrent_version_expiration_days
    error_message = "noncurrent_version_expiration_days must be a whole number of days, at least 1."
  }
}

variable "soft_delete_retention_days" {
  description = "Soft-delete retention: every deleted or replaced object (including noncurrent versions that the lifecycle rule removes) stays restorable - and billed - for this many days. 0 disables soft delete; otherwise 7 to 90 days. Default 0 because versioning already keeps deleted checkpoints recoverable for noncurrent_version_expiration_days; soft delete on top bills every evicted checkpoint for a second period. Set it when versioning is off or when you need protection against a deleted bucket's contents."
  type        = number
  default     = 0

  validation {
    condition     = var.soft_delete_retention_days == 0 || (var.soft_delete_retention_days >= 7 && var.soft_delete_retention_days <= 90 && floor(var.soft_delete_retention_days) == var.soft_delete_retention_days)
    error_message = "soft_delete_retention_days must be 0 (off) or a whole number of days from 7 to 90 (GCS limits)."
  }
}

variable "abort_incomplete_multipart_upload_days" {
  description = "Days after which GCS aborts an XML-API multipart upload that was never completed (a save killed mid-upload, e.g. a preempted VM). Its parts are invisible to listings but billed until aborted."
  type        = number
  default     = 1

  validation {
    condition     = var.abort_incomplete_multipart_upload_days >= 1 && floor(var.abort_incomplete_multipart_upload_days) == var.abort_incomplete_multipart_upload_days
    error_message = "abort_incomplete_multipart_upload_days must be a whole number of days, at least 1."
  }
}

variable "temp_object_expiration_days" {
  description = "Days after which GCS deletes cloudckpt's temporary objects (parallel-composite chunks and write probes, whose names end in \".cloudckpt-tmp\"). cloudckpt deletes them itself after composing; this catches the ones a killed process left behind."
  type        = number
  default     = 1

  validation {
    condition     = var.temp_object_expiration_days >= 1 && floor(var.temp_object_expiration_days) == var.temp_object_expiration_days
    error_message = "temp_object_expiration_days must be a whole number of days, at least 1."
  }
}

variable "kms_key_name" {
  description = "Cloud KMS key for default encryption (CMEK), as projects/<p>/locations/<l>/keyRings/<r>/cryptoKeys/<k>, in the bucket's location. null = Google-managed keys. When set, the project's Cloud Storage service agent is granted encrypt/decrypt on the key (GCS does the encryption, so the training job's service account needs no KMS role)."
  type        = string
  default     = null

  validation {
    condition     = var.kms_key_name == null || can(regex("^projects/[^/]+/locations/[^/]+/keyRings/[^/]+/cryptoKeys/[^/]+$", var.kms_key_name))
    error_message = "kms_key_name must be a full key name: projects/<project>/locations/<location>/keyRings/<ring>/cryptoKeys/<key>."
  }
}

variable "create_service_account" {
  description = "Create a service account for the training job and grant it object read/write on the bucket."
  type        = bool
  default     = true
}

variable "service_account_id" {
  description = "account_id of the created service account (6-30 characters). null = \"cloudckpt-trainer\"."
  type        = string
  default     = null

  validation {
    condition     = var.service_account_id == null || can(regex("^[a-z][a-z0-9-]{4,28}[a-z0-9]$", var.service_account_id))
    error_message = "service_account_id must be 6-30 characters: lowercase letters, digits and hyphens, starting with a letter."
  }
}

variable "object_user_members" {
  description = "Further principals granted object read/write on the bucket, as IAM members (\"serviceAccount:trainer@p.iam.gserviceaccount.com\")."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for m in var.object_user_members : can(regex("^(serviceAccount|user|group|principal|principalSet):.+$", m))])
    error_message = "object_user_members entries must be IAM members such as \"serviceAccount:name@project.iam.gserviceaccount.com\"; allUsers / allAuthenticatedUsers are refused."
  }
}

variable "force_destroy" {
  description = "Let `terraform destroy` delete the bucket even if it still holds objects (every checkpoint in it is lost). Keep false outside tests."
  type        = bool
  default     = false
}

variable "labels" {
  description = "Labels for the bucket."
  type        = map(string)
  default     = {}
}
