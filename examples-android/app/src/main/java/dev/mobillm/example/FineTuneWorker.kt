package dev.mobillm.example

import android.content.Context
import androidx.work.CoroutineWorker
import androidx.work.Data
import androidx.work.WorkManager
import androidx.work.WorkerParameters
import androidx.work.await
import androidx.work.workDataOf
import dev.mobillm.Backbone
import dev.mobillm.FineTuneOptions
import dev.mobillm.FineTuneProgress
import dev.mobillm.FineTuneResult
import dev.mobillm.FineTuneSession
import dev.mobillm.LabeledText
import dev.mobillm.MobiLlmException
import dev.mobillm.ProgressListener
import dev.mobillm.Task
import java.io.File
import java.io.IOException
import java.util.concurrent.atomic.AtomicBoolean
import kotlinx.coroutines.NonCancellable
import kotlinx.coroutines.awaitCancellation
import kotlinx.coroutines.coroutineScope
import kotlinx.coroutines.ensureActive
import kotlinx.coroutines.flow.MutableStateFlow
import kotlinx.coroutines.flow.filterNotNull
import kotlinx.coroutines.launch
import kotlinx.coroutines.sync.Mutex
import kotlinx.coroutines.sync.withLock
import kotlinx.coroutines.withContext
import org.json.JSONException
import org.json.JSONObject

/**
 * The example's fine-tune as WorkManager work. It is resumable: its state file in `filesDir` records every
 * acknowledged step, so an attempt that WorkManager stops (network lost, its ten-minute limit, the process going
 * away) loses nothing. Each attempt resumes the fine-tune when the state file is there and starts it otherwise; a
 * stopped attempt detaches it, the server trains on, and the next attempt picks it up.
 *
 * Input: [KEY_SERVER], [KEY_API_KEY], [KEY_TEMPLATE]; the model and the examples are the files [MODEL_FILE] and
 * [EXAMPLES_FILE] in `filesDir`. All of them must stay the same from attempt to attempt: resuming checks them.
 * Progress: [KEY_PHASE], [KEY_DONE], [KEY_TOTAL], [KEY_ROUND]. Output: [KEY_ZERO_SHOT], [KEY_FINETUNED],
 * [KEY_RESUMES], or [KEY_ERROR]; the adapter is saved, sealed, to [ADAPTER_FILE].
 */
class FineTuneWorker(context: Context, params: WorkerParameters) : CoroutineWorker(context, params) {

    // One attempt at a time per process, including the tail of a stopped one (see `stoppable`).
    override suspend fun doWork(): Result = attempts.withLock { attempt() }

    private suspend fun attempt(): Result {
        val files = applicationContext.filesDir
        val state = File(files, STATE_FILE)
        return try {
            val options = FineTuneOptions(
                serverUrl = inputData.getString(KEY_SERVER).orEmpty(),
                apiKey = inputData.getString(KEY_API_KEY).orEmpty(),
                statePath = state.path,
                stateKey = Keys.get(applicationContext, "state"),
            )
            val examples = readExamples(File(files, EXAMPLES_FILE))
            Backbone.load(File(files, MODEL_FILE).path).use { backbone ->
                val labels = examples.map { it.label }.distinct()
                val task = Task(backbone, inputData.getString(KEY_TEMPLATE).orEmpty(), labels)
                FineTuneSession(backbone, task).use { session ->
                    // The same split on every attempt: resuming needs the same training examples.
                    session.addExamples(examples.filterIndexed { i, _ -> i % 5 != 0 })
                    session.addHeldOut(examples.filterIndexed { i, _ -> i % 5 == 0 })
                    val result = resumeOrStart(session, options, state)
                    result.adapter.save(File(files, ADAPTER_FILE).path, Keys.get(applicationContext, "adapter"))
                    Result.success(output(result))
                }
            }
        } catch (e: MobiLlmException.Detached) {
            // Put down, its state file and server session kept: the server trains on, the next attempt resumes.
            Result.retry()
        } catch (e: MobiLlmException.Network) {
            // The state file holds the last acknowledged step: the next attempt goes on from there. (runAttemptCount
            // counts every attempt, detached ones too.)
            if (runAttemptCount < MAX_ATTEMPTS) Result.retry() else giveUp(state, e.reason)
        } catch (e: MobiLlmException.Server) {
            // A gateway in front of the server that is briefly down: like a network failure.
            val transient = e.status.toInt() in 502..504
            if (transient && runAttemptCount < MAX_ATTEMPTS) Result.retry() else giveUp(state, e.message)
        } catch (e: MobiLlmException.Cancelled) {
            Result.failure(workDataOf(KEY_ERROR to "cancelled"))
        } catch (e: MobiLlmException) {
            giveUp(state, e.message)
        } catch (e: IOException) {
            giveUp(state, "cannot read the examples: ${e.message}")
        } catch (e: JSONException) {
            giveUp(state, "cannot read the examples: ${e.message}")
        }
    }

    /** Resumes the fine-tune recorded in [state], or starts one; starts afresh if it cannot be resumed. */
    private suspend fun resumeOrStart(session: FineTuneSession, options: FineTuneOptions, state: File): FineTuneResult {
        if (state.exists()) {
            try {
                return stoppable(session) { listener -> session.resume(state.path, options, listener) }
            } catch (e: MobiLlmException.CannotResume) {
                // The server session expired (24 h without a request, by default), or the model, the examples,
                // the options or the key changed since the state file was written. Nothing to continue.
                deleteState(state)
            }
        }
        return stoppable(session) { listener -> session.fineTune(options, listener) }
    }

    /**
     * Runs one fine-tune call, passing its progress on to WorkManager and a stop of this worker on to the
     * fine-tune. The fine-tune runs on a thread of its own: cancelling the awaiting coroutine would detach it but
     * return at once, while that thread may still write the state file. So the call is awaited under
     * NonCancellable and the stop becomes `detach()` (or `cancel()` when the user cancelled): the call then ends
     * within one forward batch or one server poll, and only then does this attempt let go of the state file.
     */
    private suspend fun stoppable(
        session: FineTuneSession,
        call: suspend (ProgressListener) -> FineTuneResult,
    ): FineTuneResult = coroutineScope {
        ensureActive() // already stopped: start nothing
        val handle = session.cancelHandle()
        val latest = MutableStateFlow<FineTuneProgress?>(null)
        val listener = object : ProgressListener {
            // Called on the fine-tune's thread: keep the newest; the reporter below stores it when it can.
            override fun onProgress(progress: FineTuneProgress) {
                latest.value = progress
            }
        }
        val reporter = launch { latest.filterNotNull().collect { setProgress(progressData(it)) } }
        val ended = AtomicBoolean(false)
        val stopper = launch {
            try {
                awaitCancellation()
            } finally {
                // Reached when WorkManager stops this worker (it cancels the coroutine), or below once the call
                // has ended, when there is nothing left to stop.
                if (!ended.get()) {
                    if (cancelRequested) handle.cancel() else handle.detach()
                }
            }
        }
        try {
            withContext(NonCancellable) { call(listener) }
        } finally {
            ended.set(true)
            reporter.cancel()
            stopper.cancel()
        }
    }

    private fun giveUp(state: File, reason: String?): Result {
        // A fine-tune that failed for good is not resumed: the next one starts afresh.
        deleteState(state)
        return Result.failure(workDataOf(KEY_ERROR to (reason ?: "unknown error")))
    }

    private fun progressData(p: FineTuneProgress): Data = workDataOf(
        KEY_PHASE to p.phase.name,
        KEY_DONE to p.done.toLong(),
        KEY_TOTAL to p.total.toLong(),
        KEY_ROUND to p.round.toInt(),
    )

    private fun output(r: FineTuneResult): Data = Data.Builder().apply {
        r.zeroShotAccuracy?.let { putDouble(KEY_ZERO_SHOT, it) }
        r.finetunedAccuracy?.let { putDouble(KEY_FINETUNED, it) }
        putInt(KEY_RESUMES, r.resumes.toInt())
    }.build()

    companion object {
        const val WORK_NAME = "mobillm-fine-tune"
        const val MODEL_FILE = "model.gguf"
        const val EXAMPLES_FILE = "examples.jsonl"
        const val STATE_FILE = "fine-tune.state"
        const val ADAPTER_FILE = "adapter.sealed"

        const val KEY_SERVER = "server"
        const val KEY_API_KEY = "apiKey"
        const val KEY_TEMPLATE = "template"
        const val KEY_PHASE = "phase"
        const val KEY_DONE = "done"
        const val KEY_TOTAL = "total"
        const val KEY_ROUND = "round"
        const val KEY_ZERO_SHOT = "zeroShotAccuracy"
        const val KEY_FINETUNED = "finetunedAccuracy"
        const val KEY_RESUMES = "resumes"
        const val KEY_ERROR = "error"

        private const val MAX_ATTEMPTS = 20
        private val attempts = Mutex()

        /** Set by [cancel] so that a stop of a running attempt is a cancel rather than a detach. */
        @Volatile
        var cancelRequested = false

        /**
         * Ends the fine-tune for good. A running attempt cancels it, which deletes its server session and state
         * file. If no attempt was running (the work waited for its next one), the state file is deleted here and
         * the server deletes the session after its idle TTL.
         */
        suspend fun cancel(context: Context) {
            cancelRequested = true
            WorkManager.getInstance(context).cancelUniqueWork(WORK_NAME).await()
            attempts.withLock { deleteState(File(context.filesDir, STATE_FILE)) }
        }

        /** Deletes the state file and its sibling `<state>.tensors` (the SDK's own files; either may be missing). */
        fun deleteState(state: File) {
            state.delete()
            File(state.path + ".tensors").delete()
        }

        /** One `{"text": …, "label": …}` object per line. */
        fun readExamples(file: File): List<LabeledText> =
            file.readLines().filter { it.isNotBlank() }.map {
                val o = JSONObject(it)
                LabeledText(o.getString("text"), o.getString("label"))
            }
    }
}
