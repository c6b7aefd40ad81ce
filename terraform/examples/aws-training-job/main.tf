# A checkpoint bucket and the role a training job runs as, on EC2 (instance profile) and,
# optionally, on EKS (IRSA). The job then only needs the URL:
#
#   terraform apply -var bucket_name=acme-llm-checkpoints
#   export CKPT_DIR=$(terraform output -raw checkpoint_url)/run-42
#   python train.py   # cloudckpt.CheckpointManager(ckpt, directory=os.environ["CKPT_DIR"], ...)
#
# Credentials come from the instance profile / IRSA through boto3's default chain; nothing
# to configure in cloudckpt.

terraform {
  required_version = ">= 1.5"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.0, < 6.0"
    }
  }
}

provider "aws" {
  region = var.region
}

variable "region" {
  description = "AWS region of the training VMs and the bucket (same region: no transfer charges)."
  type        = string
  default     = "us-east-1"
}

variable "bucket_name" {
  description = "Globally unique bucket name."
  type        = string
}

variable "eks_oidc_provider_arn" {
  description = "Set to the EKS cluster's OIDC provider ARN to let the ml/trainer service account assume the role (IRSA)."
  type        = string
  default     = null
}

module "checkpoints" {
  source = "../../modules/aws-checkpoint-bucket"

  bucket_name = var.bucket_name
  key_prefix  = "checkpoints"

  # Runs under checkpoints/ are opened at checkpoints/<run>; each such storage root keeps
  # its temporary objects in <root>/.cloudckpt-tmp/. List the run directories you use, or
  # open cloudckpt storage at the prefix itself ("").
  storage_roots = ["", "run-42"]

  versioning_enabled                     = true
  noncurrent_version_expiration_days     = 7
  abort_incomplete_multipart_upload_days = 1
  temp_object_expiration_days            = 1

  create_role             = true
  role_trusted_services   = ["ec2.amazonaws.com"]
  create_instance_profile = true

  eks_oidc_provider_arn = var.eks_oidc_provider_arn
  eks_service_accounts  = var.eks_oidc_provider_arn == null ? [] : ["ml/trainer"]

  tags = {
    project = "llm-pretraining"
  }
}

output "checkpoint_url" {
  description = "Give this (or a run directory below it) to cloudckpt."
  value       = module.checkpoints.checkpoint_url
}

output "instance_profile_name" {
  description = "Launch training VMs with this instance profile."
  value       = module.checkpoints.instance_profile_name
}

output "role_arn" {
  description = "For EKS: annotate the ml/trainer service account with eks.amazonaws.com/role-arn = this."
  value       = module.checkpoints.role_arn
}
