"""Deprecated alias: the weight push moved to `k2_core.weight_push` (both trainers and engines,
e.g. `k2 serve --push-port`, use it); this module re-exports it for one release."""

from __future__ import annotations

import warnings

from k2_core.weight_push import (  # noqa: F401
    BucketChecksumError,
    Faults,
    MissingBucketError,
    PushStats,
    VersionGapError,
    WeightPusher,
    WeightPushError,
    WeightReceiver,
    buckets,
    engine_status,
    push_share,
    recv_frame,
    recv_header,
    send_frame,
    tensor_crc32,
)

warnings.warn(
    "k2_rl.weight_push moved to k2_core.weight_push; import it from there",
    DeprecationWarning,
    stacklevel=2,
)
