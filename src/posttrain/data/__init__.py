"""posttrain.data: read rows, normalise formats, apply chat templates, mask labels, pad or pack into batches."""

from posttrain.data.collate import (
    ClassificationBatch,
    PairBatch,
    PromptBatch,
    RankingBatch,
    SFTBatch,
    SharedPromptPairs,
    collate_classification,
    collate_pairs,
    collate_prompts,
    collate_rankings,
    collate_sft,
    collate_shared_pairs,
    epoch_order,
    num_batches,
    pack_sft,
    prompt_order,
    positions_from_mask,
    train_eval_split,
)
from posttrain.data.formats import (
    FORMATS,
    KINDS,
    ChatExample,
    ClassificationExample,
    DataStats,
    Example,
    PreferenceExample,
    PromptExample,
    RankingExample,
    RowError,
    TextExample,
    UnpairedExample,
    detect_format,
    label_maps,
    load_examples,
    normalize,
)
from posttrain.data.io import Row, load_rows
from posttrain.data.tokenize import (
    CHATML_TEMPLATE,
    IGNORE,
    render,
    resolve_chat_template,
    tokenize_classification,
    tokenize_examples,
    tokenize_preference,
    tokenize_prompt,
    tokenize_ranking,
    tokenize_sft,
    tokenize_unpaired,
)

__all__ = [
    "CHATML_TEMPLATE", "FORMATS", "IGNORE", "KINDS", "ChatExample", "ClassificationBatch", "ClassificationExample",
    "DataStats", "Example", "PairBatch", "PreferenceExample", "PromptBatch", "PromptExample", "RankingBatch", "SharedPromptPairs", "collate_shared_pairs",
    "RankingExample", "Row", "RowError", "SFTBatch", "TextExample", "collate_classification",
    "collate_pairs", "collate_prompts", "collate_rankings", "collate_sft", "detect_format", "epoch_order",
    "label_maps", "load_examples", "load_rows", "normalize", "num_batches", "pack_sft", "positions_from_mask", "prompt_order",
    "render", "resolve_chat_template", "tokenize_classification", "tokenize_examples", "tokenize_preference",
    "tokenize_prompt", "tokenize_ranking", "tokenize_sft", "tokenize_unpaired", "train_eval_split", "UnpairedExample",
]
