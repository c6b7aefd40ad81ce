# The identity a training job runs as: exactly the S3 calls cloudckpt makes, on the key
# prefix only (plus the KMS key when one is used), and nothing else.

locals {
  policy_name = coalesce(var.policy_name, "${var.bucket_name}-cloudckpt")
  role_name   = coalesce(var.role_name, "${var.bucket_name}-cloudckpt")

  # "arn:aws:iam::123456789012:oidc-provider/oidc.eks.<region>.amazonaws.com/id/ABC" ->
  # "oidc.eks.<region>.amazonaws.com/id/ABC", the prefix of IRSA's condition keys.
  oidc_issuer = var.eks_oidc_provider_arn == null ? "" : element(split("oidc-provider/", var.eks_oidc_provider_arn), 1)
}

data "aws_iam_policy_document" "cloudckpt" {
  # Listing: finding checkpoints, the manager's state file, data objects to delete.
  # Only listings whose prefix lies under the key prefix ("<prefix>/..."), so the job
  # cannot enumerate the rest of the bucket.
  statement {
    sid       = "ListCheckpointPrefix"
    effect    = "Allow"
    actions   = ["s3:ListBucket"]
    resources = [local.bucket_arn]

    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values   = ["${var.key_prefix}/*"]
    }
  }

  # Cleanup tooling finds multipart uploads a killed save left behind and aborts them
  # (sooner than the lifecycle rule). S3 offers no prefix condition on this action.
  statement {
    sid       = "ListStaleMultipartUploads"
    effect    = "Allow"
    actions   = ["s3:ListBucketMultipartUploads"]
    resources = [local.bucket_arn]
  }

  # GetObject covers HEAD and ranged GETs; PutObject covers single PUTs, conditional PUTs
  # (If-None-Match / If-Match), CreateMultipartUpload, UploadPart and
  # CompleteMultipartUpload; DeleteObject covers DeleteObjects (bulk delete).
  statement {
    sid    = "ReadWriteCheckpointObjects"
    effect = "Allow"
    actions = [
      "s3:AbortMultipartUpload",
      "s3:DeleteObject",
      "s3:GetObject",
      "s3:ListMultipartUploadParts",
      "s3:PutObject",
    ]
    resources = ["${local.bucket_arn}/${var.key_prefix}/*"]
  }

  # SSE-KMS: writes need a data key, reads (and multipart completion) decrypt it.
  dynamic "statement" {
    for_each = var.kms_key_arn == null ? [] : [var.kms_key_arn]

    content {
      sid       = "UseCheckpointKmsKey"
      effect    = "Allow"
      actions   = ["kms:Decrypt", "kms:GenerateDataKey"]
      resources = [statement.value]
    }
  }
}

resource "aws_iam_policy" "cloudckpt" {
  name        = local.policy_name
  description = "cloudckpt checkpoints: read/write s3://${var.bucket_name}/${var.key_prefix}/ and nothing else."
  policy      = data.aws_iam_policy_document.cloudckpt.json
  tags        = var.tags

  lifecycle {
    precondition {
      condition     = var.create_role || !var.create_instance_profile
      error_message = "create_instance_profile needs create_role = true."
    }
  }
}

data "aws_iam_policy_document" "assume_role" {
  count = var.create_role ? 1 : 0

  dynamic "statement" {
    for_each = length(var.role_trusted_services) > 0 ? [var.role_trusted_services] : []

    content {
      sid     = "TrustedServices"
      effect  = "Allow"
      actions = ["sts:AssumeRole"]

      principals {
        type        = "Service"
        identifiers = statement.value
      }
    }
  }

  # EKS IRSA: only the named service accounts of this cluster, only with STS as audience.
  dynamic "statement" {
    for_each = var.eks_oidc_provider_arn == null ? [] : [var.eks_oidc_provider_arn]

    content {
      sid     = "EksServiceAccounts"
      effect  = "Allow"
      actions = ["sts:AssumeRoleWithWebIdentity"]

      principals {
        type        = "Federated"
        identifiers = [statement.value]
      }

      condition {
        test     = "StringEquals"
        variable = "${local.oidc_issuer}:sub"
        values   = [for sa in var.eks_service_accounts : "system:serviceaccount:${split("/", sa)[0]}:${split("/", sa)[1]}"]
      }

      condition {
        test     = "StringEquals"
        variable = "${local.oidc_issuer}:aud"
        values   = ["sts.amazonaws.com"]
      }
    }
  }
}

resource "aws_iam_role" "this" {
  count = var.create_role ? 1 : 0

  name               = local.role_name
  description        = "Training jobs that save cloudckpt checkpoints to s3://${var.bucket_name}/${var.key_prefix}/"
  assume_role_policy = data.aws_iam_policy_document.assume_role[0].json
  tags               = var.tags

  lifecycle {
    precondition {
      condition     = length(var.role_trusted_services) > 0 || var.eks_oidc_provider_arn != null
      error_message = "create_role needs someone to trust: role_trusted_services and/or eks_oidc_provider_arn."
    }

    precondition {
      condition     = (var.eks_oidc_provider_arn == null) == (length(var.eks_service_accounts) == 0)
      error_message = "eks_oidc_provider_arn and eks_service_accounts go together: trusting a cluster's OIDC provider without naming service accounts would let every pod in it assume the role."
    }
  }
}

resource "aws_iam_role_policy_attachment" "this" {
  count = var.create_role ? 1 : 0

  role       = aws_iam_role.this[0].name
  policy_arn = aws_iam_policy.cloudckpt.arn
}

resource "aws_iam_instance_profile" "this" {
  count = var.create_role && var.create_instance_profile ? 1 : 0

  name = local.role_name
  role = aws_iam_role.this[0].name
  tags = var.tags

  lifecycle {
    precondition {
      condition     = contains(var.role_trusted_services, "ec2.amazonaws.com")
      error_message = "An instance profile is only useful if ec2.amazonaws.com may assume the role: add it to role_trusted_services."
    }
  }
}
