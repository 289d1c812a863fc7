from agreement.sampling import MAX_SEED, SeededSampler


def test_sampler_keys_follow_seed_epoch_and_pass():
    dataset = list(range(10))
    keys = list(SeededSampler(dataset, seed=3))
    assert keys == list(SeededSampler(dataset, seed=3))
    assert sorted(i for i, _ in keys) == list(range(10))
    assert keys != list(SeededSampler(dataset, seed=4))
    sampler = SeededSampler(dataset, seed=3)
    first_pass, second_pass = list(sampler), list(sampler)
    assert first_pass == keys and second_pass != keys  # a cycled loader does not repeat its augmentations
    sampler.set_epoch(1)
    assert list(sampler) != keys
    shards = [list(SeededSampler(dataset, seed=3, num_replicas=3, rank=r)) for r in range(3)]
    assert all(len(s) == 4 for s in shards)
    assert {i for s in shards for i, _ in s} == set(range(10))
    assert all(0 <= seed < MAX_SEED for s in shards for _, seed in s)


def test_sampler_state_restores_the_stream():
    sampler = SeededSampler(list(range(10)), seed=5)
    sampler.set_epoch(2)
    list(sampler)
    state = sampler.state_dict()
    expected = list(sampler)
    restored = SeededSampler(list(range(10)), seed=5)
    restored.load_state_dict(state)
    assert state == {"epoch": 2, "passes": 1}
    assert list(restored) == expected
