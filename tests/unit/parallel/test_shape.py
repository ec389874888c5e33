"""Who holds what in a TP x PP group: the arithmetic, and the errors for shapes a model
cannot take."""
from __future__ import annotations

import pytest

from shared.models.config import ModelConfig
from shared.parallel.shape import Shard, check_shape, split, tp_sizes_that_work

SMOLLM2 = ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                      num_heads=9, num_kv_heads=3, head_dim=64)
TINY = ModelConfig(vocab_size=211, hidden_size=64, intermediate_size=96, num_layers=4,
                   num_heads=4, num_kv_heads=2, head_dim=16)


def test_tp_2_on_a_9_head_model_names_the_heads_and_the_sizes_that_work():
    with pytest.raises(ValueError) as e:
        check_shape(SMOLLM2, 2, 1)
    msg = str(e.value)
    assert "--tp 2" in msg and "9 query heads" in msg and "3 KV heads" in msg
    assert "TP sizes that work: 1, 3" in msg
    assert tp_sizes_that_work(SMOLLM2)[:2] == [1, 3]


def test_pp_past_the_layers_is_refused():
    with pytest.raises(ValueError, match="--pp 5 is more pipeline stages than this model's 4"):
        check_shape(TINY, 1, 5)
    with pytest.raises(ValueError, match="tp=0"):
        check_shape(TINY, 0, 1)


def test_every_layer_head_column_and_vocab_row_is_held_exactly_once():
    tp, pp = 2, 2
    shards = [Shard.of(TINY, tp, pp, r) for r in range(tp * pp)]
    for stage in range(pp):
        ranks = [s for s in shards if s.stage == stage]
        assert [s.tp_rank for s in ranks] == [0, 1]
        assert {s.layers for s in ranks} == {split(4, 2, stage)}
        assert [s.q_heads for s in ranks] == [(0, 2), (2, 4)]
        assert [s.kv_heads for s in ranks] == [(0, 1), (1, 2)]
        assert [s.mlp_cols for s in ranks] == [(0, 48), (48, 96)]
        assert [s.vocab_rows for s in ranks] == [(0, 106), (106, 211)]
    assert [s.layers for s in shards] == [(0, 2), (0, 2), (2, 4), (2, 4)]
    assert [s.rank for s in shards if s.first_stage] == [0, 1]
    assert shards[2].peer(0) == 0 and shards[3].peer(0) == 1


def test_kv_heads_are_replicated_when_tp_exceeds_them():
    shards = [Shard.of(TINY, 4, 1, r) for r in range(4)]
    assert [s.q_heads for s in shards] == [(0, 1), (1, 2), (2, 3), (3, 4)]
    # query heads 0,1 attend with KV head 0; 2,3 with KV head 1 (GQA groups of 2)
    assert [s.kv_heads for s in shards] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    assert [s.kv_owner for s in shards] == [True, False, True, False]


def test_uneven_layer_split_and_smollm2_tp3():
    assert [split(30, 4, i) for i in range(4)] == [(0, 8), (8, 16), (16, 23), (23, 30)]
    s = Shard.of(SMOLLM2, 3, 1, 2)
    assert s.q_heads == (6, 9) and s.kv_heads == (2, 3) and s.mlp_cols == (1024, 1536)
    with pytest.raises(ValueError, match="rank 3 is outside a group of 3x1=3 ranks"):
        Shard.of(SMOLLM2, 3, 1, 3)
