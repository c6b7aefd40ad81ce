variable "bucket_name" {
  description = "Name of the S3 bucket to create. Globally unique, 3-63 characters of lowercase letters, digits and hyphens (no dots: see the validation message)."
  type        = string

  validation {
    condition     = length(var.bucket_name) >= 3 && length(var.bucket_name) <= 63
    error_message = "bucket_name must be 3 to 63 characters long (S3 bucket naming rules)."
  }

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9-]*[a-z0-9]$", var.bucket_name))
    error_message = "bucket_name may contain only lowercase letters, digits and hyphens, and must begin and end with a letter or digit. Dots are refused on purpose: a dotted name breaks TLS certificate validation for virtual-hosted-style requests, and this bucket accepts TLS requests only."
  }

  validation {
    condition = !anytrue([
      for reserved in ["xn--", "sthree-", "amzn-s3-demo-"] : startswith(var.bucket_name, reserved)
      ]) && !anytrue([
      for reserved in ["-s3alias", "--ol-s3", "--x-s3", "--table-s3"] : endswith(var.bucket_name, reserved)
    ])
    error_message = "bucket_name uses a prefix (xn--, sthree-, amzn-s3-demo-) or suffix (-s3alias, --ol-s3, --x-s3, --table-s3) that S3 reserves."
  }
}

variable "key_prefix" {
  description = "Key prefix (no leading or trailing slash) under which cloudckpt stores checkpoints. The IAM policy grants access to this prefix only; the checkpoint URL output is s3://<bucket>/<key_prefix>."
  type        = string
  default     = "checkpoints"

  validation {
    # No "*" or "?" (they are wildcards inside an IAM resource ARN and would widen the grant),
    # no empty segments, no segment starting with "." (".", ".." and cloudckpt's own
    # ".cloudckpt-tmp" directory are not checkpoint prefixes).
    condition     = length(var.key_prefix) <= 512 && can(regex("^[A-Za-z0-9_-][A-Za-z0-9._-]*(/[A-Za-z0-9_-][A-Za-z0-9._-]*)*$", var.key_prefix))
    error_message = "key_prefix must be one or more '/'-separated segments of letters, digits, '.', '_' or '-' (a segment may not start with '.'), without leading or trailing '/', at most 512 characters."
  }
}

variable "storage_roots" {
  description = "Paths, relative to key_prefix, at which training jobs open cloudckpt storage (the URL given to cloudckpt). cloudckpt keeps temporary objects under <storage root>/.cloudckpt-tmp/, and S3 lifecycle rules match by prefix only, so each root gets its own temporary-object rule. \"\" means the key prefix itself (s3://<bucket>/<key_prefix>)."
  type        = list(string)
  default     = [""]

  validation {
    condition = length(var.storage_roots) >= 1 && length(var.storage_roots) <= 100 && alltrue([
      for root in var.storage_roots : root == "" || can(regex("^[A-Za-z0-9_-][A-Za-z0-9._-]*(/[A-Za-z0-9_-][A-Za-z0-9._-]*)*$", root))
    ])
    error_message = "storage_roots must hold 1 to 100 entries, each \"\" or a relative path like \"run-42\" (same character rules as key_prefix)."
  }

  validation {
    condition     = length(distinct(var.storage_roots)) == length(var.storage_roots)
    error_message = "storage_roots must not repeat an entry (each becomes a lifecycle rule with a unique id)."
  }
}

variable "versioning_enabled" {
  description = "Keep previous versions of overwritten or deleted objects. Protects checkpoints against an accidental delete or a buggy overwrite, but with versioning on, a checkpoint that cloudckpt's retention deletes (max_to_keep) keeps being billed as a noncurrent version until noncurrent_version_expiration_days pass. Turning it off later suspends versioning (S3 cannot un-version a bucket)."
  type        = bool
  default     = true
}

variable "noncurrent_version_expiration_days" {
  description = "Days after an object becomes noncurrent (overwritten, or deleted by cloudckpt's retention) before S3 deletes that old version for good. This is how long deleted checkpoints stay recoverable - and billed."
  type        = number
  default     = 7

  validation {
    condition     = var.noncurrent_version_expiration_days >= 1 && floor(var.noncurrent_version_expiration_days) == var.noncurrent_version_expiration_days
    error_message = "noncurrent_version_expiration_days must be a whole number of days, at least 1."
  }
}

variable "abort_incomplete_multipart_upload_days" {
  description = "Days after which S3 aborts a multipart upload that was never completed (a save killed mid-upload, e.g. a preempted VM). Its parts are invisible to listings but billed until aborted."
  type        = number
  default     = 1

  validation {
    condition     = var.abort_incomplete_multipart_upload_days >= 1 && floor(var.abort_incomplete_multipart_upload_days) == var.abort_incomplete_multipart_upload_days
    error_message = "abort_incomplete_multipart_upload_days must be a whole number of days, at least 1."
  }
}

variable "temp_object_expiration_days" {
  description = "Days after which S3 deletes cloudckpt's temporary objects (<storage root>/.cloudckpt-tmp/...). cloudckpt deletes them itself when a save finishes; this catches the ones a killed process left behind."
  type        = number
  default     = 1

  validation {
    condition     = var.temp_object_expiration_days >= 1 && floor(var.temp_object_expiration_days) == var.temp_object_expiration_days
    error_message = "temp_object_expiration_days must be a whole number of days, at least 1."
  }
}

variable "kms_key_arn" {
  description = "ARN of a customer-managed KMS key for default encryption (SSE-KMS, with an S3 bucket key to keep KMS request costs down). null = SSE-S3 (AES-256, keys managed by S3). When set, the IAM policy also grants kms:Decrypt and kms:GenerateDataKey on this key, which cloudckpt needs to read and write objects."
  type        = string
  default     = null

  validation {
    condition     = var.kms_key_arn == null || can(regex("^arn:aws[a-zA-Z-]*:kms:[a-z0-9-]+:[0-9]{12}:key/[A-Za-z0-9-]+$", var.kms_key_arn))
    error_message = "kms_key_arn must be a KMS key ARN (arn:aws:kms:<region>:<account>:key/<id>), not an alias."
  }
}

variable "force_destroy" {
  description = "Let `terraform destroy` delete the bucket even if it still holds objects (every checkpoint in it is lost). Keep false outside tests."
  type        = bool
  default     = false
}

variable "policy_name" {
  description = "Name of the IAM policy granting cloudckpt access to the prefix. null = \"<bucket_name>-cloudckpt\"."
  type        = string
  default     = null
}

variable "create_role" {
  description = "Also create an IAM role with the policy attached, assumable by role_trusted_services (EC2, SageMaker, ...) and/or by Kubernetes service accounts through EKS IRSA (eks_oidc_provider_arn + eks_service_accounts)."
  type        = bool
  default     = false
}

variable "role_name" {
  description = "Name of the role when create_role is true. null = \"<bucket_name>-cloudckpt\"."
  type        = string
  default     = null
}

variable "role_trusted_services" {
  description = "AWS service principals allowed to assume the role (e.g. \"ec2.amazonaws.com\" for training VMs, \"sagemaker.amazonaws.com\")."
  type        = list(string)
  default     = ["ec2.amazonaws.com"]

  validation {
    condition     = alltrue([for s in var.role_trusted_services : can(regex("^[a-z0-9.-]+\\.amazonaws\\.com(\\.cn)?$", s))])
    error_message = "role_trusted_services must hold AWS service principals like \"ec2.amazonaws.com\"."
  }
}

variable "create_instance_profile" {
  description = "Create an EC2 instance profile for the role (needs create_role and ec2.amazonaws.com among role_trusted_services)."
  type        = bool
  default     = false
}

variable "eks_oidc_provider_arn" {
  description = "ARN of the EKS cluster's IAM OIDC provider, to let pods assume the role through IRSA. null = no EKS trust."
  type        = string
  default     = null

  validation {
    condition     = var.eks_oidc_provider_arn == null || can(regex("^arn:aws[a-zA-Z-]*:iam::[0-9]{12}:oidc-provider/.+$", var.eks_oidc_provider_arn))
    error_message = "eks_oidc_provider_arn must be an IAM OIDC provider ARN (arn:aws:iam::<account>:oidc-provider/<issuer>)."
  }
}

variable "eks_service_accounts" {
  description = "Kubernetes service accounts, as \"namespace/name\", whose pods may assume the role through IRSA. Required with eks_oidc_provider_arn."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for sa in var.eks_service_accounts : can(regex("^[a-z0-9]([-a-z0-9]*[a-z0-9])?/[a-z0-9]([-.a-z0-9]*[a-z0-9])?$", sa))])
    error_message = "eks_service_accounts entries must look like \"namespace/service-account-name\" (no wildcards)."
  }
}

variable "tags" {
  description = "Tags for every taggable resource this module creates."
  type        = map(string)
  default     = {}
}
