"""DispatchService.RunJobs: the network's jobs of one caller over long-lived streams.

Each gRPC call costs both sides far more CPU (metadata, half-close, status, a
dozen completions) than a message on an open stream, so a cloud replica runs its
jobs on a network replica as messages of a few streams (spread over the pods
behind the replica's address, server/cloud/job_streams.py): a job's start and
cancel one way, its events and its end the other, each tagged with its id. A job
keeps its RunJob call's semantics (server/network/job_streams.py,
server/cloud/job_streams.py), its span included: the call's span is opened per job
under the RunJob call's name, its trace context carried in the start instead of
the call's metadata.
"""

from __future__ import annotations

# The jobs one stream runs at once; a caller with more runs the others in RunJob calls.
MAX_JOBS = 1024

# The header the network accepts a stream with, sent at once. A caller writes
# nothing before it: a stream refused at its opening (UNIMPLEMENTED from a replica
# without RunJobs, UNAUTHENTICATED) then ends with its own status, which a write
# racing the refusal would replace with INTERNAL (gRPC's asyncio calls do).
ACCEPTED_HEADER = "resultity-job-stream"
ACCEPTED = "accepted"

# The call a job on the stream stands for: its spans' name (core/tracing.py).
RUN_JOB_METHOD = "/resultity.network.v1.DispatchService/RunJob"
RUN_JOBS_METHOD = "/resultity.network.v1.DispatchService/RunJobs"
