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


class SwitchableStep(StrictModel):
    """A pipeline step with an on/off switch: while it is off, its other fields change nothing.

    A switched-off step is fingerprinted as its defaults (less `used_while_disabled`, fields another
    step still reads), so an ablation that turns a step off shares its output with every recipe that
    turns it off, whatever thresholds the base recipe left in it; and a recipe that only flips
    `enabled` keeps the fingerprint it had.
    """

    used_while_disabled: ClassVar[frozenset[str]] = frozenset()

    enabled: bool = True

    def output_fields(self) -> dict[str, Any]:
        if self.enabled:
            return super().output_fields()
        kept = {name: getattr(self, name) for name in self.used_while_disabled}
        return StrictModel.output_fields(type(self)(enabled=False, **kept))
