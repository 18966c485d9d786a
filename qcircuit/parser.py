"""Placeholder until the grammar lands (being written now)."""
def parse(text, file=None):
    raise NotImplementedError
def parse_file(path):
    raise NotImplementedError
