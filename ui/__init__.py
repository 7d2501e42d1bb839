"""The Gradio dashboard (imported as ``medimesh.ui``); it talks to the oracle through the SDK.

Not built yet: the diagnosis form and live charts arrive with the oracle and dashboard issues.
"""
