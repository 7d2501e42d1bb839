"""The Gradio dashboard (imported as ``medimesh.ui``); it talks to the oracle through the SDK.

``medimesh.ui.app`` builds and serves the app; ``views``, ``charts``, ``topology`` and
``live`` hold the pure rendering and the incremental audit cache. Importing this package is
cheap: Gradio is imported only with ``medimesh.ui.app``.
"""
