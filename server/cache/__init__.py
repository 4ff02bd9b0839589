"""The result cache of detection and matting (server/cache/result_cache.py): one SQLite file
per replica, shared by the serving process (RPCs) and the job worker process (jobs)."""

from server.cache.keys import CacheKey, image_digest, model_id
from server.cache.result_cache import ResultCache, result_cache_for, result_cache_path

__all__ = ["CacheKey", "ResultCache", "image_digest", "model_id", "result_cache_for", "result_cache_path"]
