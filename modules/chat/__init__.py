"""The chat engine: characters, personas, instruction templates, prompts and saved chats.

Pure engine code: no gradio, no fastapi. Files live under the app root in characters/,
personas/, instruction-templates/ and logs/chat/; every user-given name goes through
modules.core.paths.safe_join.
"""
