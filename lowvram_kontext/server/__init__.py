"""The local web page of `serve`: one loaded pipeline, a queue of edits, the page's files and its HTTP API.

gallery.py   the session's output folder: uploads checked and kept, results, their history tree
jobs.py      the queue: one edit at a time on the pipeline, positions, cancellation, change events
editing.py   the one place an edit runs (through ``workflow.Editor``) and its progress as events
http.py      the HTTP server: routes, the token and origin checks, Server-Sent Events
static/      the page: plain HTML, CSS and JavaScript, no build step, nothing from the internet
"""
