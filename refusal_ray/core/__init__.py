"""The bottom layer: plain data and helpers that every other layer may import (no torch, no Ray,
no stage, no model). See README "Layout" for the layer order that `lint-imports` enforces."""
