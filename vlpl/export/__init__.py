"""Export a score store's pseudo-labels: a Hugging Face ``DatasetDict`` with its card (:mod:`.hf`, :mod:`.card`,
:mod:`.hub`) and the papers' file formats (:mod:`.formats`). The column schema is :mod:`.schema` (torch-free)."""
