"""Version of the on-storage corpus format.

One integer versions the whole format: dataset card, sample records, commit records and the
manifest. Writers always write :data:`SCHEMA_VERSION`; readers accept every version in
:data:`SUPPORTED_SCHEMA_VERSIONS` and reject anything else with
:class:`~storage_schemas.errors.UnsupportedSchemaVersion`. Any change a version-1 reader would
reject or misread (a new required or optional field, a renamed column, a new member suffix)
bumps the version; see ``docs/storage_format.md``.
"""

from __future__ import annotations

SCHEMA_VERSION: int = 1
SUPPORTED_SCHEMA_VERSIONS: frozenset[int] = frozenset({1})
