// The Android side of Acclimate: the library module (AAR) and the CameraX sample app. Open this
// folder in Android Studio; android/build-aar.sh builds the native libraries first.
pluginManagement {
    repositories {
        google()
        mavenCentral()
        gradlePluginPortal()
    }
}
dependencyResolutionManagement {
    repositoriesMode.set(RepositoriesMode.FAIL_ON_PROJECT_REPOS)
    repositories {
        google()
        mavenCentral()
    }
}
rootProject.name = "acclimate-android"
include(":acclimate", ":sample")
