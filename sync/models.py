"""The base of the tool's models (reports, settings): a model's validator and serializer are built the first
time it is used, not when its module is imported. A command imports every report's module and uses a few."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Model(BaseModel):
    model_config = ConfigDict(defer_build=True)
