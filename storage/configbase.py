"""The base of every config: frozen, strict, and able to say which fields change a stage's output."""
from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """A frozen pydantic model that rejects unknown keys.

    Subclasses list the fields that do not change the stage's output (worker counts, log levels)
    in `non_output_fields`; those are left out of the stage fingerprint.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    non_output_fields: ClassVar[frozenset[str]] = frozenset()

    def output_fields(self) -> dict[str, Any]:
        """The JSON-able config fields that change the output, nested models included."""
        data = self.model_dump(mode="json", exclude=set(self.non_output_fields))
        for name in data:
            value = getattr(self, name)
            if isinstance(value, StrictModel):
                data[name] = value.output_fields()
            elif isinstance(value, (list, tuple)) and value and isinstance(value[0], StrictModel):
                data[name] = [item.output_fields() for item in value]
        return data
