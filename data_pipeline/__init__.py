"""Shard writing, indexing, deterministic planning and streaming of WebDataset tar shards."""

from data_pipeline.errors import DataError
from data_pipeline.index import ShardIndex, load_index
from data_pipeline.planner import plan_epoch, plan_rank

__all__ = ["DataError", "ShardIndex", "load_index", "plan_epoch", "plan_rank"]
