"""The training recipes' checkpoint save: trainer state plus the HF-layout model (or,
under LoRA, the PEFT adapter), written in the background where the manager does.

One process with background saves writes the model from the host copy the manager
makes of the trainer state (no second copy out of the device); with pipeline stages
each stage's tensors are gathered to rank 0.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any, Callable

from ft.dtypes import DTYPES

log = logging.getLogger("ft")


def checkpoint_saver(config: Any, *, checkpoints: Any, model: Any, optimizer: Any, state: Any,
                     model_config: dict, gangs: Any, tokenizer: Any, source: Any, lora: Any,
                     runner: Any = None) -> Callable[[], Path]:
    """`save()` writes step `state.step` (call it once the step is known to be finite)."""
    from ft.lora.training import export_lora
    from ft.training.export import export_hf_model, write_hf_model_from_state
    from ft.training.pipeline_step import export_pipeline_hf_model, gather_from_stages

    dtype = DTYPES[config.save_model_dtype]
    save_model_only = getattr(config, "save_model_only", False)

    def save() -> Path:
        if lora is not None:  # with pipeline stages each stage's adapters are gathered to rank 0
            gather = functools.partial(gather_from_stages, gangs=gangs) if runner is not None else None
            export = functools.partial(export_lora, model, is_main=gangs.is_main, dtype=dtype, config=lora,
                                       source=source, tokenizer=tokenizer, gather=gather)
        elif runner is not None:  # each stage's tensors gathered to rank 0
            export = functools.partial(export_pipeline_hf_model, model, gangs=gangs, dtype=dtype,
                                       tokenizer=tokenizer, defer=checkpoints.in_background)
        else:
            export = functools.partial(export_hf_model, model, is_main=gangs.is_main, dtype=dtype,
                                       tokenizer=tokenizer, defer=checkpoints.in_background)
        export_staged = None
        if runner is None and lora is None:
            export_staged = functools.partial(write_hf_model_from_state, config=model.config, dtype=dtype,
                                              tokenizer=tokenizer)
        path = checkpoints.save(state.step, model=model, optimizer=optimizer, extra=state.state_dict(),
                                model_config=model_config, export_model=export, model_only=save_model_only,
                                export_staged=export_staged)
        if not checkpoints.in_background:  # the manager logs background saves, with the pause
            log.info("saved checkpoint %s", path)
        return path

    return save
