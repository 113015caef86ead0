plugins {
    id("com.android.application")
    id("org.jetbrains.kotlin.android")
}

android {
    namespace = "dev.mobillm.example"
    compileSdk = 35
    defaultConfig {
        applicationId = "dev.mobillm.example"
        minSdk = 26
        targetSdk = 35
        versionCode = 1
        versionName = "0.1"
    }
    // The generated bindings (`cargo xtask bindings`) are compiled into the app; the Rust libraries per ABI
    // come from `cargo xtask android` (into src/main/jniLibs).
    sourceSets["main"].java.srcDir("../../bindings/kotlin/src/main/kotlin")
    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }
    kotlinOptions { jvmTarget = "17" }
}

dependencies {
    implementation("net.java.dev.jna:jna:5.15.0@aar")
    implementation("org.jetbrains.kotlinx:kotlinx-coroutines-android:1.9.0")
    implementation("androidx.activity:activity-ktx:1.9.3")
    implementation("androidx.lifecycle:lifecycle-runtime-ktx:2.8.7")
    implementation("androidx.appcompat:appcompat:1.7.0")
    // WorkManager runs the resumable fine-tune (FineTuneWorker); its manifest brings the permissions it needs.
    implementation("androidx.work:work-runtime-ktx:2.10.0")
}
