"""Every Redis key name and every default value of the node, in one place."""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_PREFIX = "mesh:"
DEFAULT_GROUP = "mesh-nodes"
DEFAULT_CONCURRENCY = 16
DEFAULT_CONFIG_PATH = "config/security-config.json"

DEFAULT_MODEL = "claude-sonnet-5-5"
DEFAULT_MAX_TOKENS = 1024
DEFAULT_MAX_OUTPUT_TOKENS = 8192
DEFAULT_MAX_EXECUTION_TIME_MS = 300_000
DEFAULT_MAX_TASK_BYTES = 1_048_576
DEFAULT_MAX_PROMPT_BYTES = 524_288
# Far above what `maxOutputTokens` lets an answer reach (8,192 tokens are some
# 32 kB of text); an answer past it is refused, not cut.
DEFAULT_MAX_RESPONSE_BYTES = 1_048_576
DEFAULT_RESULT_RETENTION_S = 86_400
# The results and dead-letter streams are trimmed to about this many entries:
# a day's results at one a second, and a bound on Redis's memory whatever
# the node's history.
DEFAULT_RESULTS_MAX_LEN = 100_000
DEFAULT_DEAD_MAX_LEN = 10_000
DEFAULT_MAX_ATTEMPTS = 4
DEFAULT_RETRY_MAX_TOTAL_S = 120.0
DEFAULT_GRACE_PERIOD_S = 25.0
DEFAULT_MAX_DELIVERIES = 5
# Bounds of the derived claim timeout (see `Settings.claim_timeout_ms`).
MIN_CLAIM_TIMEOUT_MS = 5_000
MAX_CLAIM_TIMEOUT_MS = 60_000

# How long one XREADGROUP may block: short enough that a stop request is seen
# promptly, long enough that an idle node costs nothing measurable.
READ_BLOCK_MS = 1_000

TASK_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

# Stream entry fields (design.md, "Redis layout").
FIELD_TASK = "task"
FIELD_TRACEPARENT = "traceparent"
FIELD_TASK_ID = "taskId"
FIELD_RESULT = "result"
# Dead-letter entry fields.
FIELD_ENTRY_ID = "entryId"
FIELD_REASON = "reason"
FIELD_DELIVERIES = "deliveries"
FIELD_NODE = "node"


def hash_tag(prefix: str) -> str | None:
    """The hash tag that a prefix gives every key under it, if any.

    Redis Cluster hashes only the part of a key between its first `{` and the
    first `}` after it, when that part is not empty
    (https://redis.io/docs/latest/operate/oss_and_stack/reference/cluster-spec/#hash-tags).
    A prefix that holds such a pair decides the tag of every key that starts
    with it, whatever follows; one that holds a lone `{` does not, since a
    `}` in a node or task id would then close the tag.
    """
    opening = prefix.find("{")
    closing = prefix.find("}", opening + 1) if opening >= 0 else -1
    if closing <= opening + 1:
        return None
    return prefix[opening + 1 : closing]


@dataclass(frozen=True, slots=True)
class Keys:
    """The Redis key names under one prefix.

    On a Redis Cluster the prefix holds a hash tag (`{mesh}:`), so that every
    key of one stream, the limiter's included, lands in one slot and each
    script and pipeline touches a single node.

    Args:
        prefix: prepended to every key, `mesh:` unless configured.
    """

    prefix: str = DEFAULT_PREFIX

    @property
    def tasks(self) -> str:
        """The task intake stream."""
        return f"{self.prefix}tasks"

    @property
    def results(self) -> str:
        """The stream of published results, one entry per finished task."""
        return f"{self.prefix}results"

    @property
    def dead(self) -> str:
        """The dead-letter stream."""
        return f"{self.prefix}dead"

    def result(self, task_id: str) -> str:
        """The stored result of one task id, which makes the id idempotent."""
        return f"{self.prefix}result:{task_id}"

    def lease(self, task_id: str) -> str:
        """The short lease held while one task id runs."""
        return f"{self.prefix}lease:{task_id}"

    def node(self, node_id: str) -> str:
        """The heartbeat hash of one node."""
        return f"{self.prefix}node:{node_id}"
