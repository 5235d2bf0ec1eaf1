"""Adapters that speak other ecosystems' image APIs over the native submit/wait path.

``openai`` — OpenAI Images (``/v1/images/*``); ``a1111`` — AUTOMATIC1111 (``/sdapi/v1/*``).
Both translate to native field names, submit through :func:`service.submission.submit`
(same queue, batching, auth and limits), wait with :mod:`service.job_wait` and answer in
their own shapes, errors included. No torch, no ``model`` imports here.
"""
