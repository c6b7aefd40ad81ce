output "bucket_name" {
  description = "Name of the checkpoint bucket."
  value       = aws_s3_bucket.this.id
}

output "bucket_arn" {
  description = "ARN of the checkpoint bucket."
  value       = aws_s3_bucket.this.arn
}

output "key_prefix" {
  description = "Key prefix the IAM policy grants access to."
  value       = var.key_prefix
}

output "checkpoint_url" {
  description = "URL to hand to cloudckpt (e.g. CheckpointManager(directory=...) or a run directory below it): s3://<bucket>/<key_prefix>."
  # Built from the resource, not the variable, so the URL only exists once the bucket does.
  value = "s3://${aws_s3_bucket.this.id}/${var.key_prefix}"
}

output "policy_arn" {
  description = "ARN of the IAM policy granting cloudckpt's access; attach it to your own role if create_role is false."
  value       = aws_iam_policy.cloudckpt.arn
}

output "policy_json" {
  description = "The IAM policy document, for review."
  value       = data.aws_iam_policy_document.cloudckpt.json
}

output "role_arn" {
  description = "ARN of the training job's role (null unless create_role)."
  value       = one(aws_iam_role.this[*].arn)
}

output "role_name" {
  description = "Name of the training job's role (null unless create_role)."
  value       = one(aws_iam_role.this[*].name)
}

output "instance_profile_name" {
  description = "EC2 instance profile for training VMs (null unless create_instance_profile)."
  value       = one(aws_iam_instance_profile.this[*].name)
}
