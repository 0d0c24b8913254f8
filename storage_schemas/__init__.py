"""storage_schemas: the on-storage contract between the generation pipeline and the trainer.

One concept per module:

- :mod:`~storage_schemas.errors`: the :class:`CorpusFormatError` family.
- :mod:`~storage_schemas.version`: :data:`SCHEMA_VERSION` of the whole format.
- :mod:`~storage_schemas.card`: :class:`DatasetCard`, the content of ``dataset.json``.
- :mod:`~storage_schemas.record`: :class:`SampleRecord` and its tar-member codec.
- :mod:`~storage_schemas.shard`: deterministic shard tars and a safe streaming reader.
- :mod:`~storage_schemas.manifest`: :class:`ShardCommit` records and ``manifest.parquet``.
- :mod:`~storage_schemas.layout`: :class:`CorpusLayout`, where each object lives.

Pure bytes in, bytes out: no object-storage I/O, no Ray, no pickle. See ``docs/storage_format.md``.
"""

from .card import (
    CONDITIONING_KINDS,
    SIGMA_TOLERANCE,
    SOLVER_NAMES,
    STATE_DTYPES,
    Conditioning,
    DatasetCard,
    GuidanceRange,
    SolverInfo,
    TeacherInfo,
)
from .errors import (
    CorpusFormatError,
    NonFiniteError,
    SchemaError,
    ShapeMismatchError,
    UnsafeMemberError,
    UnsupportedSchemaVersion,
)
from .layout import (
    COMMITS_DIR,
    DATASET_CARD,
    MANIFEST,
    SHARDS_DIR,
    CorpusLayout,
    commit_relpath,
    shard_id,
    shard_number,
    shard_relpath,
    validate_relative_path,
    validate_shard_id,
)
from .manifest import (
    MANIFEST_SCHEMA,
    ShardCommit,
    manifest_from_parquet_bytes,
    manifest_to_parquet_bytes,
    manifest_validation_ids,
    utc_now_iso,
)
from .record import (
    META_MEMBER,
    SAMPLE_MEMBER_SUFFIXES,
    TORCH_DTYPES,
    TRAJ_MEMBER,
    SampleRecord,
    check_record_against_card,
    decode_sample,
    encode_sample,
    sample_key,
    validate_key,
)
from .shard import iter_shard_members, iter_shard_samples, write_shard_bytes
from .version import SCHEMA_VERSION, SUPPORTED_SCHEMA_VERSIONS

__all__ = [
    "COMMITS_DIR",
    "CONDITIONING_KINDS",
    "DATASET_CARD",
    "MANIFEST",
    "MANIFEST_SCHEMA",
    "META_MEMBER",
    "SAMPLE_MEMBER_SUFFIXES",
    "SCHEMA_VERSION",
    "SHARDS_DIR",
    "SIGMA_TOLERANCE",
    "SOLVER_NAMES",
    "STATE_DTYPES",
    "SUPPORTED_SCHEMA_VERSIONS",
    "TORCH_DTYPES",
    "TRAJ_MEMBER",
    "Conditioning",
    "CorpusFormatError",
    "CorpusLayout",
    "DatasetCard",
    "GuidanceRange",
    "NonFiniteError",
    "SampleRecord",
    "SchemaError",
    "ShapeMismatchError",
    "ShardCommit",
    "SolverInfo",
    "TeacherInfo",
    "UnsafeMemberError",
    "UnsupportedSchemaVersion",
    "check_record_against_card",
    "commit_relpath",
    "decode_sample",
    "encode_sample",
    "iter_shard_members",
    "iter_shard_samples",
    "manifest_from_parquet_bytes",
    "manifest_to_parquet_bytes",
    "manifest_validation_ids",
    "sample_key",
    "shard_id",
    "shard_number",
    "shard_relpath",
    "utc_now_iso",
    "validate_key",
    "validate_relative_path",
    "validate_shard_id",
    "write_shard_bytes",
]
