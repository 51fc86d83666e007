"""SFT data: JSONL reading, row formats -> `Example`, packing, the resumable batch reader.

    examples = read_examples("DIR", tokenizer, split="train", max_seq_len=2048)
    reader = BatchReader(examples, max_seq_len=2048, max_num_tokens=8192, seed=2,
                         max_num_data_epochs=3, dp_size=dp, dp_rank=r, gradient_accumulation=ga)
    while (batches := reader.next_step_batches()) is not None:
        ...  # each Batch: tokens_BT, labels_BT (-100 = no loss, already shifted), positions_BT,
             # document_ids_BT, num_target_tokens, num_tokens, num_examples
    state = reader.state_dict()  # plain ints; reader.load_state_dict(state) continues exactly

    prompts = read_prompts("test.jsonl", tokenizer)  # generation: PromptRow(id, prompt_text, ...)
"""

from ft.data.dataset import (
    DatasetSource,
    DatasetStats,
    ExampleSet,
    available_splits,
    discover_splits,
    read_examples,
    read_prompts,
    resolve_dataset,
)
from ft.data.formats import (
    AUTO,
    DATA_FORMATS,
    Example,
    PromptRow,
    RowFormat,
    detect_format,
    normalize_format,
    row_to_example,
    row_to_prompt,
)
from ft.data.packing import IGNORE_INDEX, PAD_DOCUMENT_ID, Batch, collate, labels_of, pack_rows
from ft.data.reader import BatchReader, iter_validation_batches, micro_batch_size

__all__ = [
    "AUTO",
    "DATA_FORMATS",
    "IGNORE_INDEX",
    "PAD_DOCUMENT_ID",
    "Batch",
    "BatchReader",
    "DatasetSource",
    "DatasetStats",
    "Example",
    "ExampleSet",
    "PromptRow",
    "RowFormat",
    "available_splits",
    "collate",
    "detect_format",
    "discover_splits",
    "iter_validation_batches",
    "labels_of",
    "micro_batch_size",
    "normalize_format",
    "pack_rows",
    "read_examples",
    "read_prompts",
    "resolve_dataset",
    "row_to_example",
    "row_to_prompt",
]
