// CameraX sample: ImageAnalysis (keep only the latest frame) → Session.pushFrame → an overlay of
// the source model's top-1 against the adapted one. The model is read from the app's assets
// (android/build-aar.sh copies assets/mobilenetv2.onnx there when it exists).
plugins {
    id("com.android.application")
    id("org.jetbrains.kotlin.android")
}

android {
    namespace = "dev.acclimate.sample"
    compileSdk = 35

    defaultConfig {
        applicationId = "dev.acclimate.sample"
        minSdk = 26
        targetSdk = 35
        versionCode = 1
        versionName = "0.1.0"
    }
    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }
    kotlinOptions {
        jvmTarget = "17"
    }
    androidResources {
        // The ONNX model is read whole into memory: keep it uncompressed in the APK.
        noCompress += "onnx"
    }
}

dependencies {
    implementation(project(":acclimate"))
    val camerax = "1.4.1"
    implementation("androidx.camera:camera-core:$camerax")
    implementation("androidx.camera:camera-camera2:$camerax")
    implementation("androidx.camera:camera-lifecycle:$camerax")
    implementation("androidx.camera:camera-view:$camerax")
    implementation("androidx.appcompat:appcompat:1.7.0")
}
