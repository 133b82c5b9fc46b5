// The Acclimate AAR: the generated UniFFI bindings (src/main/kotlin/dev/acclimate/acclimate.kt),
// the frame helpers, and libacclimate_ffi.so per ABI in src/main/jniLibs (android/build-aar.sh).
plugins {
    id("com.android.library")
    id("org.jetbrains.kotlin.android")
}

android {
    namespace = "dev.acclimate"
    compileSdk = 35

    defaultConfig {
        // Android 8.0: the oldest release whose devices ship Vulkan 1.1 drivers widely (wgpu's
        // Vulkan backend needs 1.1); the manifest requires the feature so Play filters the rest.
        minSdk = 26
        consumerProguardFiles("consumer-rules.pro")
        ndk {
            abiFilters += listOf("arm64-v8a", "armeabi-v7a", "x86_64")
        }
    }

    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }
    kotlinOptions {
        jvmTarget = "17"
    }
    packaging {
        jniLibs {
            // Stored uncompressed and page-aligned in the APK, loaded in place (16 KB pages:
            // the libraries are linked with max-page-size=16384 by build-aar.sh).
            useLegacyPackaging = false
        }
    }
}

dependencies {
    // The generated bindings call the library through JNA; the @aar variant carries
    // libjnidispatch.so for every Android ABI.
    implementation("net.java.dev.jna:jna:5.14.0@aar")
    // ImageProxy for CameraFrames.kt; apps bring their own CameraX version.
    compileOnly("androidx.camera:camera-core:1.4.1")
}
