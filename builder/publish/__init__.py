"""Push and pull built deployments as OCI artifacts (``dsbuild push`` / ``dsbuild pull``)."""

from builder.publish.pull import PullResult, pull_run
from builder.publish.push import PushResult, push_run
from builder.publish.reference import OciReference, parse_reference

__all__ = ["OciReference", "PullResult", "PushResult", "parse_reference", "pull_run", "push_run"]
