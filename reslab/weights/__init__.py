"""Pretrained weights: the tags shipped in this folder (``<model>.<tag>/`` in the Hugging Face Hub
layout) and in ``$RESLAB_HOME/weights``, with fetching, the sha256 check and loading.

Use them through ``reslab.create_model(name, pretrained=True | "TAG" | PATH)`` or a ``MODEL:TAG``
target of ``reslab eval`` / ``lesion`` / ``paths``; write them with ``reslab weights publish``.
See docs/weights.md.
"""
from reslab.weights.pretrained import (CARD_FILE, CONFIG_FILE, HUB_CARD_FILE, WEIGHTS_FILE, WeightsEntry, cache_dir,
                                       default_entry, fetch, get_entry, list_pretrained, load_pretrained, published_file,
                                       read_config, read_header, registry, reslab_home, resolve_model_spec,
                                       resolve_pretrained, sha256_file, tags_for, verify)

__all__ = ["CARD_FILE", "CONFIG_FILE", "HUB_CARD_FILE", "WEIGHTS_FILE", "WeightsEntry", "cache_dir", "default_entry",
           "fetch", "get_entry", "list_pretrained", "load_pretrained", "published_file", "read_config", "read_header",
           "registry", "reslab_home", "resolve_model_spec", "resolve_pretrained", "sha256_file", "tags_for", "verify"]
