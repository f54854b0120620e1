"""A job from spool to delivery: the queue, the Celery tasks, the steps, recovery, bundles."""
