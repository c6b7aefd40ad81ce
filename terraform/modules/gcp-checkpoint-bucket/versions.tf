terraform {
  # 1.5: the oldest release whose variable validation, preconditions and string functions
  # (startswith) this module relies on behave as written.
  required_version = ">= 1.5"

  required_providers {
    google = {
      source = "hashicorp/google"
      # soft_delete_policy and the AbortIncompleteMultipartUpload lifecycle action need 5.x.
      version = ">= 5.30, < 7.0"
    }
  }
}
