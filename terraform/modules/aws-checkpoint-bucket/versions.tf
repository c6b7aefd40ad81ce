terraform {
  # 1.5: the oldest release whose variable validation, preconditions and `optional`
  # object attributes this module relies on behave as written.
  required_version = ">= 1.5"

  required_providers {
    aws = {
      source = "hashicorp/aws"
      # 5.x: the split-out S3 bucket resources (lifecycle, encryption, versioning, ...)
      # with the schema used here; 6.x is untested.
      version = ">= 5.0, < 6.0"
    }
  }
}
