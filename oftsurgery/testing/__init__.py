"""Test helpers that ship with the package, so that the demo and users can use them outside pytest.

`oftsurgery.testing.hub_server.LocalHub` is a small Hugging Face Hub stand-in on 127.0.0.1 that
speaks the write protocol huggingface_hub uses for `create_repo` + `upload_folder`.
"""
