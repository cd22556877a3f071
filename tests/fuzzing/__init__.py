"""A seeded mutation fuzzer over every reader of user files (issue 18).

    seeds.py      small valid inputs of each kind, built once into a folder
    mutators.py   byte, JSON, safetensors-header, GGUF-header and file-system mutations
    readers.py    what each reader is asked to do with a (mutated) input
    runner.py     worker processes (time and memory limits) and the outcome of every case

A case is (reader, index, master seed): everything it does follows from those three, so a
failure is reproduced by running that one case again (`python -m fuzzing.runner READER INDEX`).
"""

READERS = ("model", "packed", "run", "hf", "gguf", "tokenizer", "data")
