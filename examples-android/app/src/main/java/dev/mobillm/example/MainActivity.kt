package dev.mobillm.example

import android.net.Uri
import android.os.Bundle
import android.widget.Button
import android.widget.EditText
import android.widget.ProgressBar
import android.widget.TextView
import androidx.activity.result.contract.ActivityResultContracts
import androidx.appcompat.app.AppCompatActivity
import androidx.lifecycle.lifecycleScope
import dev.mobillm.Adapter
import dev.mobillm.Backbone
import dev.mobillm.CancelHandle
import dev.mobillm.FineTuneOptions
import dev.mobillm.FineTuneProgress
import dev.mobillm.FineTuneSession
import dev.mobillm.LabeledText
import dev.mobillm.MobiLlmException
import dev.mobillm.ProgressListener
import dev.mobillm.Task
import java.io.File
import kotlinx.coroutines.Dispatchers
import kotlinx.coroutines.launch
import kotlinx.coroutines.withContext
import org.json.JSONObject

/**
 * Pick a GGUF model and a JSONL file of {"text","label"} lines, fine-tune through an assist server with a
 * progress bar, then classify new text. The texts and labels never leave the phone: only rotated, quantised
 * activations and rotated targets do (see the repository README).
 */
class MainActivity : AppCompatActivity() {
    private var backbone: Backbone? = null
    private var adapter: Adapter? = null
    private var cancel: CancelHandle? = null

    private val pickModel = registerForActivityResult(ActivityResultContracts.OpenDocument()) { uri ->
        uri?.let { loadModel(it) }
    }
    private val pickData = registerForActivityResult(ActivityResultContracts.OpenDocument()) { uri ->
        uri?.let { fineTune(it) }
    }

    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        setContentView(R.layout.activity_main)
        findViewById<Button>(R.id.pickModel).setOnClickListener { pickModel.launch(arrayOf("*/*")) }
        findViewById<Button>(R.id.pickData).setOnClickListener { pickData.launch(arrayOf("*/*")) }
        findViewById<Button>(R.id.cancel).setOnClickListener { cancel?.cancel() }
        findViewById<Button>(R.id.predict).setOnClickListener { predict() }
        // A previous fine-tune's adapter, from private storage.
        val saved = File(filesDir, "adapter.safetensors")
        if (saved.exists()) adapter = runCatching { Adapter.load(saved.path) }.getOrNull()
    }

    private fun status(text: String) = findViewById<TextView>(R.id.status).setText(text)

    private fun loadModel(uri: Uri) = lifecycleScope.launch {
        status("Loading the model…")
        try {
            backbone = withContext(Dispatchers.IO) {
                // The backbone is memory-mapped from a file: copy the picked document into app storage once.
                val file = File(filesDir, "model.gguf")
                contentResolver.openInputStream(uri)!!.use { input -> file.outputStream().use { input.copyTo(it) } }
                Backbone.load(file.path)
            }
            status("Model loaded (${backbone!!.layers()} layers)")
            findViewById<Button>(R.id.predict).isEnabled = adapter != null
        } catch (e: MobiLlmException) {
            status("Cannot load the model: ${e.message}")
        }
    }

    private fun fineTune(uri: Uri) = lifecycleScope.launch {
        val backbone = backbone ?: return@launch status("Pick the model first")
        val examples = withContext(Dispatchers.IO) {
            contentResolver.openInputStream(uri)!!.bufferedReader().readLines().filter { it.isNotBlank() }.map {
                val o = JSONObject(it)
                LabeledText(o.getString("text"), o.getString("label"))
            }
        }
        val labels = examples.map { it.label }.distinct()
        val progressBar = findViewById<ProgressBar>(R.id.progress)
        val cancelButton = findViewById<Button>(R.id.cancel)
        try {
            val task = Task(backbone, findViewById<EditText>(R.id.template).text.toString(), labels)
            val session = FineTuneSession(backbone, task)
            // Hold out one example in five to show the gain.
            session.addExamples(examples.filterIndexed { i, _ -> i % 5 != 0 })
            session.addHeldOut(examples.filterIndexed { i, _ -> i % 5 == 0 })
            cancel = session.cancelHandle()
            cancelButton.isEnabled = true
            val listener = object : ProgressListener {
                // Called on the fine-tune's own thread: hop to the UI thread.
                override fun onProgress(progress: FineTuneProgress) = runOnUiThread {
                    val fraction = if (progress.total > 0uL) progress.done.toDouble() / progress.total.toDouble() else 0.0
                    progressBar.progress = (fraction * 1000).toInt()
                    status("${progress.phase} ${progress.done}/${progress.total} (round ${progress.round})")
                }
            }
            val options = FineTuneOptions(
                serverUrl = findViewById<EditText>(R.id.server).text.toString(),
                apiKey = findViewById<EditText>(R.id.apiKey).text.toString(),
            )
            val result = session.fineTune(options, listener) // suspends; never blocks the UI thread
            result.adapter.save(File(filesDir, "adapter.safetensors").path)
            adapter = result.adapter
            status("Held-out accuracy ${pct(result.zeroShotAccuracy)} → ${pct(result.finetunedAccuracy)}")
            findViewById<Button>(R.id.predict).isEnabled = true
        } catch (e: MobiLlmException.Cancelled) {
            status("Cancelled")
        } catch (e: MobiLlmException) {
            status("Fine-tuning failed: ${e.message}")
        } finally {
            cancelButton.isEnabled = false
        }
    }

    private fun pct(x: Double?) = x?.let { "%.1f%%".format(it * 100) } ?: "n/a"

    private fun predict() = lifecycleScope.launch {
        val backbone = backbone ?: return@launch
        val adapter = adapter ?: return@launch
        val text = findViewById<EditText>(R.id.input).text.toString()
        val p = withContext(Dispatchers.Default) { adapter.predict(backbone, text) }
        val scores = adapter.labels().zip(p.scores).joinToString { (l, s) -> "$l %.2f".format(s) }
        findViewById<TextView>(R.id.prediction).text = "${p.label} ($scores)"
    }
}
