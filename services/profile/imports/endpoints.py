"""Internal reads of an import: who a ``profile.imported`` announcement names."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path

from services.profile.imports.repository import ImportRepository
from shared.contracts.bus import ImportBatch
from shared.errors import NotFound
from shared.service import Runtime, runtime

router = APIRouter()
RuntimeDep = Annotated[Runtime, Depends(runtime)]


@router.get(
    "/internal/import-batches/{batch_id}", response_model=ImportBatch, include_in_schema=False
)
async def import_batch(batch_id: Annotated[int, Path(ge=1)], rt: RuntimeDep) -> ImportBatch:
    """The customers of one committed import batch with their versions after it (erased
    customers left out); 404 once older than the PROFILE stream's retention."""
    assert rt.db is not None
    async with rt.db.sessions() as session:
        batch = await ImportRepository(session).batch(batch_id)
    if batch is None:
        raise NotFound(f"No import batch {batch_id}.")
    return batch
